// The golden corpus: hand-picked hard cases plus seeded random strings.
const fixed = [
  '', ' ', '  ', '\t', '\n', '\r\n', 'a', 'Hello world', 'Hello, world!', ' Hello world ',
  'hello   world', 'hello \t\n world', 'line1\nline2\r\nline3\rline4', '\n\n\n', ' \n \n ', 'a\u00a0b\u2003c\u3000d',
  'x\u2028y\u2029z', 'tab\tsep\tvalues', 'trailing spaces   ', '   leading spaces', 'nbsp\u00a0\u00a0\u00a0end',
  "I'm you're he's she'd we'll they've it's can't won't", "I'M YOU'RE HE'S SHE'D WE'LL THEY'VE", "i'M yOu'Re He'S",
  "'s 't 're 've 'm 'll 'd", "don't'll've", "rock'n'roll", "O'Neil's", "l'ſ don'ſ x'Ll",
  '1', '12', '123', '1234', '12345678901234567890', '3.14159', '1,000,000', '-42', '0x1F', '٣٤٥ ١٢٣', '½ ⅓ ¼ Ⅻ ① ²³',
  'function foo(bar) {\n  return bar * 2;\n}\n', 'if (x == y) { z = x + y; } // comment',
  'def f(x):\n\tif x:\n\t\treturn [i**2 for i in range(10)]\n', '#include <stdio.h>\nint main(){printf("%d\\n",1);}',
  'SELECT * FROM users WHERE id = 42;', '<div class="a">Text</div>', '{"key": "value", "n": [1, 2, 3]}',
  'https://example.com/path/to/page?query=1&b=2#frag', 'mailto:someone@example.org', 'C:\\Users\\name\\file.txt', '/usr/local/bin//x///',
  '😀', '👍🏽', '👨‍👩‍👧‍👦', '🏳️‍🌈', '🇩🇪🇯🇵', 'emoji 🤖 in 🧠 text ✨', '❤️‍🔥',
  '你好，世界！', '日本語のテキストです。', '한국어 텍스트', '中文English混合text', 'ภาษาไทยไม่มีช่องว่าง', 'مرحبا بالعالم', 'שלום עולם',
  'Привет, мир!', 'Γειά σου Κόσμε', 'नमस्ते दुनिया', 'হ্যালো', 'Ελληνικά ΚΕΦΑΛΑΙΑ', 'ǅungla ǈudi', 'ÀÉÎÕÜ àéîõü', 'straße STRASSE',
  'e\u0301 a\u0308 o\u0302\u0323', '\u0301\u0301abc', 'x\u0301\u0302\u0303Y', ' \u0301', 'A\u0301B', 'ABC\u0301', '\u0300',
  'ﬁ ﬂ ｆｕｌｌｗｉｄｔｈ', '\ufeffBOM at start', 'mid\ufeffBOM', 'ctrl\u0000\u0001\u0007\u001b[31mred\u001b[0m', '\u200b\u200c\u200d zero width',
  'DEL\u007f and \u0085 NEL', 'soft\u00adhyphen', '<|start|>user<|message|>hi<|end|>', '<|endoftext|>', '<|begin_of_text|>', '<s>[INST] hi [/INST]</s>',
  '<|reserved_200000|> <|eot_id|>', '<|', '|>', '<<||>>', '<|notaspecial|>', 'ALLCAPS WORDS HERE', 'camelCaseWordsHere', 'snake_case_words_here', 'HTTPServerError',
  'iPhone McDonald MacBook', 'ŁÓDŹ łódź', '...!!!???', '—–-', '"quoted" \'single\' «guillemets» „low"', '$100 €50 ¥1000 £3', 'a/b/c\n/d',
  '!\n\n', '?\r\n\r\n', 'x //\n', '  \n\t\n  x', 'end\n', '\n start',
];

function mulberry32(a) {
  return function () {
    a |= 0; a = (a + 0x6d2b79f5) | 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const pools = [
  'abcdefghijklmnopqrstuvwxyz', 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', '0123456789', ' ', '   ', '\t', '\n', '\r\n', '\r',
  ".,;:!?'\"()[]{}<>/\\|-_=+*&^%$#@~`", "'s't're've'm'll'd'S'T'RE", '\u00a0\u2000\u2009\u3000\u2028\u0085\u000b\u000c',
  'éèêëàâäôöûüçñßøåæœ', 'ÉÈÊËÀÂÄÔÖÛÜÇÑØÅÆŒ', '\u0300\u0301\u0302\u0308\u0323\u20dd\u0903', 'αβγδεζηθΑΒΓΔ', 'абвгдеёжзАБВГДЕ',
  '你好世界中文字符测试', 'ひらがなカタカナ', '한국어글자', 'ภาษาไทย', 'مرحبا', 'עברית', 'हिन्दी', '٠١٢٣٤٥', '①②③½¼²',
  'ǅǈǋǲ', 'ʰʲʷˠ々ー', '\u200b\u200c\u200d\ufeff\u00ad', '\u0000\u0001\u001f\u007f',
];
const emoji = ['😀', '👍🏽', '👨‍👩‍👧', '🏳️‍🌈', '🇯🇵', '✨', '❤️', '🤖', '𝔘𝔫𝔦', '𐐷', '🀄'];

function randomString(rnd) {
  const n = 1 + Math.floor(rnd() * 40);
  let s = '';
  for (let i = 0; i < n; i++) {
    const r = rnd();
    if (r < 0.06) { s += emoji[Math.floor(rnd() * emoji.length)]; continue; }
    if (r < 0.12) { // any BMP or astral code point, no surrogates
      let cp = Math.floor(rnd() * (rnd() < 0.8 ? 0x10000 : 0x30000));
      if (cp >= 0xd800 && cp <= 0xdfff) cp = 0x41;
      s += String.fromCodePoint(cp);
      continue;
    }
    const p = pools[Math.floor(rnd() * pools.length)];
    const chars = Array.from(p);
    const k = 1 + Math.floor(rnd() * 6);
    for (let j = 0; j < k; j++) s += chars[Math.floor(rnd() * chars.length)];
  }
  return s;
}

export function corpus() {
  const rnd = mulberry32(20251125);
  const texts = [...fixed];
  for (let i = 0; i < 4000; i++) texts.push(randomString(rnd));
  // Long inputs: a mixed document and long runs.
  texts.push(fixed.join('\n').repeat(20));
  texts.push(' '.repeat(3000) + 'x');
  texts.push('a'.repeat(5000));
  texts.push('9'.repeat(1000));
  texts.push('\n'.repeat(500) + 'z' + ' \n'.repeat(300));
  texts.push('🤖'.repeat(500));
  return texts;
}

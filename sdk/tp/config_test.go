package tp

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llama-orch/orch/sdk"
)

func TestParseExtra(t *testing.T) {
	full := func(rank, size, addr string) map[string]string {
		return map[string]string{ExtraRank: rank, ExtraSize: size, ExtraAddr: addr}
	}
	cases := []struct {
		name    string
		extra   map[string]string
		want    Config
		ok      bool
		wantErr string
	}{
		{name: "nil", extra: nil},
		{name: "unrelated keys", extra: map[string]string{"other": "1"}},
		{name: "leader", extra: full("0", "2", "127.0.0.1:4000"), want: Config{Rank: 0, Size: 2, Addr: "127.0.0.1:4000"}, ok: true},
		{name: "follower spaces", extra: full(" 3 ", "4", " 127.0.0.1:1 "), want: Config{Rank: 3, Size: 4, Addr: "127.0.0.1:1"}, ok: true},
		{name: "only rank", extra: map[string]string{ExtraRank: "0"}, wantErr: "missing tp.size, tp.addr"},
		{name: "no addr", extra: map[string]string{ExtraRank: "0", ExtraSize: "2"}, wantErr: "missing tp.addr"},
		{name: "rank not int", extra: full("x", "2", "a:1"), wantErr: `tp.rank="x"`},
		{name: "size not int", extra: full("0", "two", "a:1"), wantErr: `tp.size="two"`},
		{name: "size 1", extra: full("0", "1", "a:1"), wantErr: "at least 2 ranks"},
		{name: "size huge", extra: full("0", "100000", "a:1"), wantErr: "exceeds"},
		{name: "rank too big", extra: full("2", "2", "a:1"), wantErr: "rank 2 out of range [0, 2)"},
		{name: "rank negative", extra: full("-1", "2", "a:1"), wantErr: "rank -1 out of range"},
		{name: "empty addr", extra: full("1", "2", " "), wantErr: "empty group address"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg, ok, err := ParseExtra(tc.extra)
			if tc.wantErr != "" {
				require.Error(t, err)
				assert.ErrorIs(t, err, sdk.ErrInvalidArgument)
				assert.Contains(t, err.Error(), tc.wantErr)
				assert.False(t, ok)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.ok, ok)
			assert.Equal(t, tc.want, cfg)
		})
	}
}

#!/usr/bin/env python3
"""Print a seeded prompt of N in-vocab normal token ids (token_type 1) of a GGUF as a JSON array.
Usage: tokens.py MODEL.gguf N SEED"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gguf_reader import GGUFFile  # noqa: E402
from ref_tokens import make_tokens  # noqa: E402

g = GGUFFile(sys.argv[1])
print(json.dumps(make_tokens(g, int(sys.argv[2]), int(sys.argv[3]))))

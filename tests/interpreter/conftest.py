import os

# This directory is only collected with TRITON_INTERPRET=1 (see tests/conftest.py);
# fail loudly if someone points pytest at it directly without it.
if os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("tests/interpreter needs TRITON_INTERPRET=1 set before Python starts: run `make test-interpreter`")

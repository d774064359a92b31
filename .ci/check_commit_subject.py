"""commit-msg hook (pre-commit): the subject line of a commit message has at most 72 characters."""

import sys

LIMIT = 72

with open(sys.argv[1], encoding="utf-8") as f:
    subject = f.readline().rstrip("\n")
if len(subject) > LIMIT:
    sys.exit(f"commit subject has {len(subject)} characters, at most {LIMIT}: put the details in the body")

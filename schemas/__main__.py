"""`python -m stepline.schemas`: rewrite `Event.current.avsc` from the split
files (tests/test_schema_files.py fails while it is stale)."""

from __future__ import annotations

from stepline.schemas import CURRENT_FILE, current_text

if __name__ == "__main__":
    text = current_text()
    if CURRENT_FILE.exists() and CURRENT_FILE.read_text(encoding="utf-8") == text:
        print(f"{CURRENT_FILE} is up to date")
    else:
        CURRENT_FILE.write_text(text, encoding="utf-8")
        print(f"wrote {CURRENT_FILE}")

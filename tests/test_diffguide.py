"""The "how X differs from GRPO" diff blocks in docs/X.md match the files (python diffguide.py fixes them)."""
import pytest

import diffguide


@pytest.mark.parametrize("name", diffguide.TRAINERS)
def test_docs_diff_block_is_current(name):
    text = open(diffguide.doc_path(name)).read()
    assert diffguide.render(text, name) == text, f"docs/{name[:-3]}.md diff block is stale: run `python diffguide.py`"


def test_stale_block_is_detected():
    name = diffguide.TRAINERS[0]
    text = open(diffguide.doc_path(name)).read()
    stale = text.replace(f"<!-- diff:{name} begin -->\n", f"<!-- diff:{name} begin -->\nold text\n", 1)
    assert diffguide.render(stale, name) != stale


def test_missing_block_is_an_error():
    with pytest.raises(ValueError, match="no '<!-- diff:gspo.py begin/end -->' block"):
        diffguide.render("# GSPO\nno block here\n", "gspo.py")

"""The "how X differs from GRPO" diff blocks in docs/X.md match the files (python -m tools.diffguide fixes them)."""
import pytest

from tools import diffguide


@pytest.mark.parametrize("name", diffguide.TRAINERS)
def test_docs_diff_block_is_current(name):
    text = open(diffguide.doc_path(name)).read()
    assert diffguide.render(text, name) == text, f"docs/{name[:-3]}.md diff block is stale: run `python -m tools.diffguide`"


def test_stale_block_is_detected():
    name = diffguide.TRAINERS[0]
    text = open(diffguide.doc_path(name)).read()
    stale = text.replace(f"<!-- diff:{name} begin -->\n", f"<!-- diff:{name} begin -->\nold text\n", 1)
    assert diffguide.render(stale, name) != stale


def test_missing_block_is_an_error():
    with pytest.raises(ValueError, match="no '<!-- diff:gspo.py begin/end -->' block"):
        diffguide.render("# GSPO\nno block here\n", "gspo.py")


def test_every_python_excerpt_in_the_docs_is_code_as_it_is():
    """A ```python block in docs/ quotes the code: each of its lines (but `...` and comment lines) is a line of a
    trainer, the plumbing or a tool today, so an excerpt cannot go stale when the code changes."""
    import glob
    import re
    root = diffguide.ROOT
    code = {line.strip() for pattern in ("*.py", "grpo_family/*.py", "tools/*.py")
            for path in glob.glob(f"{root}/{pattern}") for line in open(path, encoding="utf-8")}
    stale = []
    for path in sorted(glob.glob(f"{root}/docs/*.md")):
        text = re.sub(r"<!-- diff:\S+ begin -->.*?<!-- diff:\S+ end -->", "", open(path, encoding="utf-8").read(),
                      flags=re.S)
        for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
            stale += [f"{path[len(root) + 1:]}: {line.strip()}" for line in block.splitlines()
                      if line.strip() not in ("", "...") and not line.strip().startswith("#")
                      and line.strip() not in code]
    assert not stale, "excerpts in docs/ that are no longer the code:\n" + "\n".join(stale[:20])


def test_help_prints_the_usage_and_a_wrong_flag_is_one_line(capsys):
    before = {n: open(diffguide.doc_path(n)).read() for n in diffguide.TRAINERS}
    assert diffguide.main(["--help"]) == 0 and "python -m tools.diffguide --check" in capsys.readouterr().out
    assert diffguide.main(["--chek"]) == 2
    out, err = capsys.readouterr()
    assert err.strip().splitlines() == ["diffguide.py: error: unknown argument(s) --chek: the only option is --check "
                                        "(see --help)"] and not out
    assert before == {n: open(diffguide.doc_path(n)).read() for n in diffguide.TRAINERS}  # nothing rewritten

"""The house a student opens: at the root only what a student runs; the plumbing in one package, imported one way;
tools apart. Each rule below is checked on the files as they are, so that the layout cannot drift:
1. The root's Python files are the trainers (tools/trainers.py), sample.py and eval_gsm8k.py, nothing else.
2. Imports run downward (tools -> trainers and entry points -> grpo_family), with no circle; a trainer imports the
   plumbing's modules with one line, the same in every trainer, never a name out of them.
3. Every module of grpo_family/ and tools/ opens with a map that names each of its public functions and classes.
4. No Python file outside tests/ is over 450 lines (split a file by what it holds, never trim it to fit).
5. No module writes another module's private state; the trainers are listed once (tools/trainers.py); one
   predicate (distributed.cuda_numerics) decides GPU numerics, everywhere bf16 is chosen by device.
"""
import ast
import os
import re

import pytest

from helpers import ROOT
from tools import trainers

PACKAGES = ("grpo_family", "tools")


def python_files():
    """Every Python file of the repository outside tests/ and the virtual environment, relative to the root."""
    out = [f for f in os.listdir(ROOT) if f.endswith(".py")]
    for pkg in PACKAGES:
        out += [os.path.join(pkg, f) for f in sorted(os.listdir(os.path.join(ROOT, pkg))) if f.endswith(".py")]
    return sorted(out)


def module_name(path):
    """'grpo_family/rollout.py' -> 'grpo_family.rollout'; 'grpo.py' -> 'grpo'; a package's __init__ -> its name."""
    name = path[:-3].replace(os.sep, ".")
    return name[:-len(".__init__")] if name.endswith(".__init__") else name


def tree(path):
    return ast.parse(open(os.path.join(ROOT, path), encoding="utf-8").read())


def imports_of(path):
    """The repository's own modules `path` imports: `from grpo_family import a, b` gives grpo_family.a and .b."""
    ours = {module_name(p) for p in python_files()}
    found = set()
    for node in ast.walk(tree(path)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in ours or a.name.split(".")[0] in PACKAGES}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                found.add(full if full in ours else node.module)
    return {m for m in found if m in ours and m != module_name(path)}


def layer(module):
    """2 tools, 1 the trainers and the two entry points at the root, 0 the plumbing."""
    return 2 if module.startswith("tools") else 0 if module.startswith("grpo_family") else 1


def test_the_root_holds_the_trainers_and_the_two_entry_points_only():
    root = sorted(f for f in os.listdir(ROOT) if f.endswith(".py"))
    assert root == sorted([f"{name}.py" for name in trainers.TRAINERS] + ["sample.py", "eval_gsm8k.py"]), root


def test_imports_run_downward_with_no_circle():
    graph = {module_name(p): imports_of(p) for p in python_files()}
    upward = [(m, d) for m, deps in graph.items() for d in deps if layer(d) > layer(m)]
    assert not upward, f"imports that go up (tools -> trainers -> grpo_family is the only way down): {upward}"
    sideways = [(m, d) for m, deps in graph.items() for d in deps if layer(m) == layer(d) == 1]
    assert not sideways, f"a trainer or entry point imports another: {sideways}"
    state = {}

    def visit(m, stack):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", "import circle: " + " -> ".join(stack[stack.index(m):] + [m])
        state[m] = "open"
        for d in sorted(graph[m]):
            visit(d, stack + [m])
        state[m] = "done"
    for m in sorted(graph):
        visit(m, [])


def test_every_trainer_imports_the_plumbing_with_the_same_line_and_only_modules():
    pattern = re.compile(r"^from grpo_family import (.+)$", re.M)
    lines = {}
    for name in trainers.TRAINERS:
        text = open(trainers.path(name), encoding="utf-8").read()
        found = pattern.findall(text)
        assert len(found) == 1, f"{name}.py imports grpo_family in {len(found)} lines; one, as grpo.py does"
        lines[name] = found[0]
        assert "import grpo_family." not in text and "from grpo_family." not in text, \
            f"{name}.py imports names out of a grpo_family module: call module.name, as grpo.py does"
        modules = [m.strip() for m in found[0].split(",")]
        assert all(os.path.isfile(os.path.join(ROOT, "grpo_family", m + ".py")) for m in modules), modules
    assert len(set(lines.values())) == 1, lines


@pytest.mark.parametrize("path", [p for p in python_files() if p.split(os.sep)[0] in PACKAGES])
def test_every_module_opens_with_a_map_of_its_public_names(path):
    t = tree(path)
    doc = ast.get_docstring(t)
    assert doc, f"{path} has no module docstring: open it with a map of what it holds"
    public = [n.name for n in t.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_")
              and n.name != "main"]
    missing = [n for n in public if not re.search(rf"(?<![\w.]){re.escape(n)}\b", doc)]
    assert not missing, f"{path}: its opening map does not name {missing}"


def test_the_map_checker_fails_on_an_unnamed_function(tmp_path, monkeypatch):
    pkg = tmp_path / "tools"
    pkg.mkdir()
    (pkg / "x.py").write_text('"""x.py: holds shown."""\n\ndef shown():\n    pass\n\n\ndef hidden():\n    pass\n')
    monkeypatch.setattr(__import__("test_house"), "ROOT", str(tmp_path))
    with pytest.raises(AssertionError, match=r"does not name \['hidden'\]"):
        test_every_module_opens_with_a_map_of_its_public_names(os.path.join("tools", "x.py"))


def test_no_file_is_over_450_lines():
    long = {p: n for p in python_files() if (n := len(open(os.path.join(ROOT, p), encoding="utf-8").readlines())) > 450}
    assert not long, f"over 450 lines (split by what each holds, never trim to fit): {long}"


def test_no_module_writes_another_s_private_state():
    bad = []
    for path in python_files():
        for node in ast.walk(tree(path)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
                if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            for target in targets:
                while isinstance(target, (ast.Subscript, ast.Attribute)):
                    if isinstance(target, ast.Attribute) and target.attr.startswith("_") and \
                            isinstance(target.value, ast.Name) and target.value.id not in ("self", "cls"):
                        bad.append(f"{path}:{node.lineno}: {target.value.id}.{target.attr}")
                    target = target.value
    assert not bad, f"writes to another module's private state: {bad}"


def test_the_trainers_are_listed_once():
    """No file but tools/trainers.py writes out the family: a literal holding five or more trainer names."""
    names = set(trainers.TRAINERS) | {f"{n}.py" for n in trainers.TRAINERS}
    lists = []
    for path in python_files() + [os.path.join("tests", f) for f in os.listdir(os.path.join(ROOT, "tests"))
                                  if f.endswith(".py")]:
        if path == os.path.join("tools", "trainers.py"):
            continue
        for node in ast.walk(tree(path)):
            if isinstance(node, (ast.List, ast.Tuple, ast.Set, ast.Dict)):
                items = node.keys if isinstance(node, ast.Dict) else node.elts
                strings = [x.value for x in items if isinstance(x, ast.Constant) and isinstance(x.value, str)]
                if sum(s in names for s in strings) >= 5:
                    lists.append(f"{path}:{node.lineno}")
    assert not lists, f"the list of trainers written out again (read tools/trainers.py instead): {lists}"


def test_one_predicate_decides_gpu_numerics():
    """Wherever bf16 is chosen by the device, distributed.cuda_numerics decides: no `... "cuda" ...` test next to a
    bfloat16 anywhere else."""
    bad = []
    for path in python_files():
        if path == os.path.join("grpo_family", "distributed.py"):
            continue
        for node in ast.walk(tree(path)):
            if isinstance(node, (ast.IfExp, ast.If)):
                test, body = ast.unparse(node.test), ast.unparse(node.body) if isinstance(node, ast.IfExp) else \
                    "\n".join(ast.unparse(s) for s in node.body)
                if '"cuda"' in test and "bfloat16" in body:
                    bad.append(f"{path}:{node.lineno}")
    assert not bad, f"bf16 chosen by the device outside distributed.cuda_numerics: {bad}"

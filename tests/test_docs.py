"""The documentation tells the truth: the command-line reference is what docs/make_cli_reference
writes from the configuration, every relative link in a tracked Markdown file resolves, README
stays short, every shell command in README is run here (with 2 DDIM steps) or marked as needing
real weights, and the Python examples of README and docs/ run on the toy pack."""

import json
import os
import re
import shlex
import subprocess
import sys

import jax
import pytest

from docs import make_cli_reference
from tests.test_wording import ROOT, tracked_text_files

REAL_WEIGHTS = "# real weights"  # a fenced block starting with this line is not run here
STEPS = "2"  # DDIM steps the README's commands run with here: what they show stays the same
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def markdown_files() -> list[str]:
    return [n for n in tracked_text_files() if n.endswith(".md")]


def blocks(name: str, languages: tuple[str, ...]) -> list[str]:
    """The fenced blocks of a Markdown file in these languages, without the marked ones."""
    with open(os.path.join(ROOT, name)) as f:
        text = f.read()
    return [
        body
        for lang, body in FENCE.findall(text)
        if lang in languages and not body.lstrip().lower().startswith(REAL_WEIGHTS)
    ]


def _cli_reference() -> tuple[str, list[str]]:
    """(docs/cli.md as the script renders it, launch.py's flag names), from a fresh process:
    absl's flags are global, and other tests' command lines define some of the same names."""
    code = (
        "import json, launch\n"
        "from docs import make_cli_reference as m\n"
        "names = [f.name for mod, fl in launch.FLAGS.flags_by_module_dict().items() for f in fl"
        " if mod.startswith('launch.py')]\n"
        "print(json.dumps([m.render(), names]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text, names = json.loads(done.stdout.strip().splitlines()[-1])
    return text, names


def test_cli_reference_is_current():
    text, _ = _cli_reference()
    with open(make_cli_reference.OUT) as f:
        assert f.read() == text, "docs/cli.md is stale: run python -m docs.make_cli_reference"


def test_cli_reference_names_every_flag_and_preset_value():
    text, names = _cli_reference()
    assert len(names) > 40
    for name in names:
        assert f"`--{name}`" in text, name
    for preset, values in make_cli_reference.C.PRESETS.items():
        for key, value in values.items():
            assert f"`{key}={make_cli_reference.show_value(value)}`" in text, (preset, key)


def anchors(path: str) -> set[str]:
    """The anchors of a Markdown file's headings, as GitHub makes them."""
    with open(path) as f:
        headings = [line.lstrip("#").strip() for line in f if line.startswith("#")]
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_relative_links_in_markdown_resolve():
    broken = []
    for name in markdown_files():
        with open(os.path.join(ROOT, name)) as f:
            text = f.read()
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # web addresses and anchors
            file, _, anchor = target.partition("#")
            path = os.path.normpath(os.path.join(ROOT, os.path.dirname(name), file))
            if not os.path.exists(path):
                broken.append(f"{name}: {target}")
            elif anchor and anchor not in anchors(path):
                broken.append(f"{name}: {target} (no such heading)")
    assert not broken, "links to missing files:\n" + "\n".join(broken)


def test_readme_is_a_short_guide():
    with open(os.path.join(ROOT, "README.md")) as f:
        lines = f.read().splitlines()
    assert len(lines) <= 260, f"README.md has {len(lines)} lines; move long material to docs/"


def shell_commands(text: str) -> tuple[list[list[str]], dict[str, str]]:
    """(commands as argument lists, in order; files written by heredocs: name -> content)."""
    files = {}

    def heredoc(m):
        files[m.group(1)] = m.group(3)
        return ""

    text = re.sub(r"cat > (\S+) <<'(\w+)'\n(.*?\n)\2\n", heredoc, text, flags=re.DOTALL)
    text = text.replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            commands.append(words[:cut])
            words = words[cut + 1 :]
    return commands, files


def _run_cases(command: str, cases: list[dict]) -> list[dict]:
    done = subprocess.run(
        [sys.executable, "-m", "tests.cli_runner", command],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def command_kind(words: list[str]) -> str | None:
    """What a README command is, for the test that runs it; None: no test runs it."""
    if words[:3] == ["pip", "install", "-r"] and len(words) == 4:
        return "install"
    if words[:3] == ["python", "-m", "pytest"]:
        return "tests"
    if words[:3] == ["python", "launch.py", "--serve"]:
        return "serve"  # the browser editor's test starts it so (tests/editor_browser.py)
    if words[:2] == ["python", "launch.py"]:
        return "launch"
    if words[:3] == ["python", "-m", "mgjax.evaluation.evaluate"]:
        return "evaluate"
    return None


def readme_commands() -> tuple[list[list[str]], dict[str, str]]:
    """README's shell commands outside the blocks marked as needing real weights."""
    commands, files = [], {}
    for body in blocks("README.md", ("bash", "sh", "shell")):
        more, written = shell_commands(body)
        commands += more
        files.update(written)
    return commands, files


def test_shell_commands_are_parsed_as_a_shell_would():
    text = "cat > j.jsonl <<'END'\n{\"a\": 1}\nEND\npip install -r r.txt && python launch.py \\\n"
    text += '    --prompt "a b" --out_dir out/x   # comment\n'
    commands, files = shell_commands(text)
    assert files == {"j.jsonl": '{"a": 1}\n'}
    assert commands == [
        ["pip", "install", "-r", "r.txt"],
        ["python", "launch.py", "--prompt", "a b", "--out_dir", "out/x"],
    ]
    assert command_kind(["gcloud", "compute"]) is None


def test_every_readme_shell_command_is_one_a_test_runs_or_marked():
    """Each command is a toy-pack command the next test runs, an install line naming a file
    that exists, or the test line CI runs; anything else is marked as needing real weights."""
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    commands, _ = readme_commands()
    assert len(commands) >= 5
    unknown = [" ".join(w) for w in commands if command_kind(w) is None]
    assert not unknown, (
        f"README commands neither run by a test nor marked {REAL_WEIGHTS!r}: {unknown}"
    )
    for words in commands:
        line, kind = " ".join(words), command_kind(words)
        if kind == "install":
            assert os.path.isfile(os.path.join(ROOT, words[3])), line
        elif kind == "tests":
            assert line in ci, f"README's test command is not the one .ci/run runs: {line}"
        elif kind == "serve":
            with open(os.path.join(ROOT, "tests", "editor_browser.py")) as f:
                source = f.read()
            assert '"launch.py",' in source and '"--serve",' in source, line


def add(groups: list, command: str, case: dict) -> None:
    """Appends a case, merging consecutive cases of one command line into one process."""
    if groups and groups[-1][0] == command:
        groups[-1][1].append(case)
    else:
        groups.append((command, [case]))


@pytest.mark.slow
def test_every_readme_shell_command_runs_or_needs_real_weights(tmp_path):
    """The toy-pack commands run as written, with --steps 2 and outputs under a temporary
    folder, in README's order (the evaluation and the resume use the demo's run)."""
    commands, files = readme_commands()
    for name, content in files.items():
        (tmp_path / name).write_text(content)

    def local(arg: str) -> str:
        if arg in files or arg.startswith("out/"):
            return str(tmp_path / arg)
        return arg

    groups: list[tuple[str, list]] = []  # consecutive cases of one command line, in order
    for words in commands:
        line, kind = " ".join(words), command_kind(words)
        if kind == "launch":
            args = [local(a) for a in words[2:]]
            args += ["--steps", STEPS]
            add(groups, "launch", dict(args=args, work=str(tmp_path), line=line))
        elif kind == "evaluate":
            args = [local(a) for a in words[3:]]
            add(groups, "evaluate", dict(args=args, work=str(tmp_path), line=line))
    assert sum(len(cases) for _, cases in groups) >= 5
    for command, cases in groups:
        results = _run_cases(command, [dict(args=c["args"], work=c["work"]) for c in cases])
        for case, result in zip(cases, results, strict=True):
            assert result["code"] == 0, (case["line"], result["stderr"][-2000:])


@pytest.mark.slow
def test_python_examples_run_on_the_toy_pack():
    """README's example, then docs/*.md's in order, in one namespace (each page continues the
    README's example), with the toy preset's steps cut to 2."""
    names = ["README.md", *sorted(n for n in markdown_files() if n.startswith("docs/"))]
    code = [b for n in names for b in blocks(n, ("python",))]
    assert code, "no Python examples found"
    resolve = 'config.resolve(preset="toy")'
    assert resolve in code[0], "the README example does not start from the toy preset"
    namespace: dict = {}
    for body in code:
        body = body.replace(resolve, f'config.resolve({{"steps": {STEPS}}}, preset="toy")')
        exec(compile(body, "<docs example>", "exec"), namespace)  # noqa: S102
    assert namespace["edited"].shape == (1, 64, 64, 3)
    assert namespace["slope"].shape == (1,) and bool(jax.numpy.isfinite(namespace["slope"]).all())


def test_the_research_notebook_keeps_small_outputs_and_no_errors():
    """docs/research.ipynb is stored with its outputs (small PNGs and printed lines, no errors),
    so that it reads on GitHub without running it."""
    import nbformat

    path = os.path.join(ROOT, "docs", "research.ipynb")
    assert os.path.getsize(path) < 400_000, "store small pictures only (figure.dpi 50)"
    outputs = [o for c in nbformat.read(path, as_version=4).cells for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 5


@pytest.mark.slow
def test_the_research_notebook_runs_on_the_toy_pack():
    """docs/research.ipynb top to bottom in a fresh kernel (docs/run_notebook.py): a failing
    cell fails here, naming it. A few minutes on 2 CPU cores."""
    from docs.run_notebook import execute

    nb = execute()
    outputs = [o for c in nb.cells for o in c.get("outputs", [])]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 5

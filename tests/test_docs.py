"""The docs say what is there: every command line shown in README.md and docs/*.md parses with the
tool's own setup_arg_parser(), every relative link resolves, and the README's map names the files
the package has."""

import argparse
import contextlib
import importlib
import io
import itertools
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]

# Where a command starts in a line: `python -m mlx_mla.generate`, `python -m benchmarks.decode`,
# `python convert.py`, `python benchmarks/convert_v2_lite.py`, or a console script at the start.
PYTHON_M = re.compile(r"\bpython3? -m ((?:mlx_mla|benchmarks)\.\w+)(?=\s|$)")
PYTHON_FILE = re.compile(r"\bpython3? ((?:benchmarks/|examples/)?\w+\.py)(?=\s|$)")
CONSOLE = re.compile(r"^(?:\$ )?(?:[A-Z_]+=\S* )*(mlx_mla\.\w+)(?=\s|$)")
FILE_MODULES = {"convert.py": "mlx_mla.convert"}  # the top-level script and the module it runs
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*(,\.\.\.)?$")  # PATH, N, PATH_OR_HUB_ID, URL,...
SHELL_END = {"|", "||", "&&", ";", ">", ">>", "2>&1", "&"}
FENCE = re.compile(r"^```(\w*)\s*$")
# Missing required flags are fine where the prose only names a tool and some of its flags.
MISSING_REQUIRED = ("the following arguments are required", "one of the arguments")


@dataclass
class Command:
    where: str  # file:line
    module: str  # mlx_mla.generate, benchmarks.decode, convert.py, ...
    script: bool  # run as a console script (`mlx_mla.generate ...`), not through python
    text: str  # the arguments as written
    inline: bool  # a `code span` in prose rather than a line of a code block


def strip_comment(line: str) -> str:
    """The line without a shell comment (a # that starts a word outside quotes)."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def find_command(text: str, where: str, inline: bool) -> Command | None:
    script = False
    if not (m := PYTHON_M.search(text) or PYTHON_FILE.search(text)):
        text = text.strip()
        if not (m := CONSOLE.search(text)):
            return None
        if inline and not text[m.end() :].strip():
            return None  # a console script named in prose, not a command line
        script = True
    return Command(where, m.group(1), script, text[m.end() :], inline)


def block_commands(lines: list[str], start: int, name: str):
    """Commands in the lines of one code block: `\\` continues a line, and so does a next line
    that is indented and opens with `[` or `-` (the usage synopses)."""
    i = 0
    while i < len(lines):
        first = i
        line = strip_comment(lines[i])
        while i + 1 < len(lines) and (
            line.endswith("\\") or re.match(r"\s+[\[-]", lines[i + 1] or "")
        ):
            i += 1
            line = line.removesuffix("\\") + " " + strip_comment(lines[i]).strip()
        i += 1
        if command := find_command(line, f"{name}:{start + first + 1}", inline=False):
            yield command


def inline_commands(prose: str, first_line: int, name: str):
    for m in re.finditer(r"`([^`\n]+(?:\n[^`\n]+)*)`", prose):
        line = first_line + prose.count("\n", 0, m.start())
        text = m.group(1).replace("\n", " ")
        if command := find_command(text, f"{name}:{line}", inline=True):
            yield command


def doc_commands(text: str, name: str) -> list[Command]:
    """Every command line of a Markdown text: in code blocks (not python ones) and code spans."""
    commands, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        prose_start = i
        while i < len(lines) and not FENCE.match(lines[i]):
            i += 1
        commands += inline_commands("\n".join(lines[prose_start:i]), prose_start + 1, name)
        if i == len(lines):
            break
        language = FENCE.match(lines[i])[1]
        end = i + 1
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        if language not in ("python", "py"):
            commands += block_commands(lines[i + 1 : end], i + 1, name)
        i = end + 1
    return commands


def split_brackets(tokens: list[str]) -> list[str]:
    out = []
    for token in tokens:
        opening = len(token) - len(token.lstrip("["))
        closing = len(token) - len(token.rstrip("]"))
        core = token[opening : len(token) - closing]
        out += ["["] * opening + ([core] if core else []) + ["]"] * closing
    return out


def parse_synopsis(tokens: list[str]):
    """Tokens into a tree: a word, or a list of alternatives (each a tree) for `[a | b]`. A `|`
    outside brackets (or `&&`, `>`...) is the shell's: the command ends there."""
    stack = [[[]]]  # groups, each a list of alternatives, each a list of items
    for token in tokens:
        if token == "[":
            stack.append([[]])
        elif token == "]" and len(stack) > 1:
            group = stack.pop()
            stack[-1][-1].append(group)
        elif token == "|" and len(stack) > 1:
            stack[-1].append([])
        elif token in SHELL_END:
            break
        else:
            stack[-1][-1].append(token)
    while len(stack) > 1:  # an unclosed bracket: close it
        group = stack.pop()
        stack[-1][-1].append(group)
    return stack[0][0]


def variants(items) -> list[list[str]]:
    """The command without any optional group, and with each group's each alternative in turn."""
    words = [t for t in items if isinstance(t, str)]
    out = [words]
    for i, item in enumerate(items):
        if isinstance(item, list):
            before = [t for t in items[:i] if isinstance(t, str)]
            after = [t for t in items[i + 1 :] if isinstance(t, str)]
            out += [before + v + after for alt in item for v in variants(alt)]
    return out


def value_choices(argv: list[str]) -> list[list[str]]:
    """`--attention mla|mha` is two commands, one for each value."""
    options = [t.split("|") if "|" in t and not t.startswith("-") else [t] for t in argv]
    return [list(v) for v in itertools.product(*options)]


def substitute(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """Placeholders (PATH, N, URL,...) as a value the flag before them takes: its default or first
    choice, else "1"."""
    out = []
    for i, token in enumerate(argv):
        action = parser._option_string_actions.get(argv[i - 1]) if i else None
        if PLACEHOLDER.match(token) and action is not None and action.nargs != 0:
            if action.choices:
                token = str(next(iter(action.choices)))
            elif action.default is not None and not isinstance(action.default, bool):
                token = str(action.default)
            else:
                token = "1"
        out.append(token)
    return out


def argvs(command: Command, parser) -> list[list[str]]:
    elided = re.sub(r"(?<!\S)\.\.\.(?!\S)", " ", command.text)  # an unquoted ... stands for more
    tokens = split_brackets(shlex.split(elided))
    return [
        substitute(parser, argv)
        for variant in variants(parse_synopsis(tokens))
        for argv in value_choices(variant)
    ]


def module_name(module: str) -> str:
    module = FILE_MODULES.get(module, module)
    return module.removesuffix(".py").replace("/", ".")  # python benchmarks/convert_v2_lite.py


def setup_arg_parser(module: str):
    return importlib.import_module(module_name(module)).setup_arg_parser()


def problems(command: Command) -> list[str]:
    """What would go wrong running the command as written: an unknown tool or flag, a value the
    flag refuses; a required flag left out (in a code block, not in prose)."""
    name = command.module
    if command.script and name not in SCRIPTS:
        return [f"{name}: no such console script (pyproject.toml has {', '.join(SCRIPTS)})"]
    try:
        parser = setup_arg_parser(name)
    except (ImportError, AttributeError) as e:
        return [f"{name}: no tool with a setup_arg_parser() ({e})"]
    found = []
    for argv in argvs(command, parser):
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
                _, unknown = parser.parse_known_args(argv)
        except SystemExit as e:
            message = stderr.getvalue().strip().splitlines()[-1:] or [f"exit {e.code}"]
            if e.code != 0 and not (
                command.inline and any(m in message[0] for m in MISSING_REQUIRED)
            ):
                found.append(f"{name} {' '.join(argv)}: {message[0]}")
            continue
        if unknown:
            found.append(f"{name} {' '.join(argv)}: unknown {' '.join(unknown)}")
    return found


ALL_COMMANDS = [
    c for f in DOC_FILES for c in doc_commands(f.read_text(), f.relative_to(ROOT).as_posix())
]


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=lambda c: f"{c.where} {c.module}")
def test_every_command_line_in_the_docs_parses(command):
    try:
        importlib.import_module(module_name(command.module))
    except ModuleNotFoundError as e:
        if e.name in ("torch", "transformers", "sentencepiece"):  # the training example's
            pytest.skip(f"{command.module} needs {e.name}")
    assert problems(command) == []


def test_the_docs_show_commands_of_every_kind():
    """The extraction finds what it must, so the test above cannot pass by finding nothing."""
    modules = {c.module for c in ALL_COMMANDS}
    for tool in (
        "mlx_mla.generate",
        "mlx_mla.chat",
        "mlx_mla.server",
        "mlx_mla.memory",
        "convert.py",
    ):
        assert tool in modules
    assert any(m.startswith("benchmarks.") for m in modules)
    assert any(c.inline for c in ALL_COMMANDS) and any(not c.inline for c in ALL_COMMANDS)


def found(markdown: str) -> list[str]:
    return [p for c in doc_commands(markdown, "example.md") for p in problems(c)]


def block(*lines: str) -> str:
    return "\n".join(["```bash", *lines, "```"])


@pytest.mark.parametrize(
    "markdown, message",
    [
        (block("python -m mlx_mla.generate --prompt x --no-such-flag"), "unknown --no-such-flag"),
        ("Run `python -m mlx_mla.generate --prompt x --attention gqa`.", "invalid choice: 'gqa'"),
        (block("python -m mlx_mla.server [--model PATH] [--kv-bits 7]"), "invalid choice: 7"),
        (block("python -m mlx_mla.chat \\", "    --bogus 1   # continued"), "unknown --bogus 1"),
        (block("python -m mlx_mla.chat", "   [--temp T] [--kv-bits 8 --bogus]"), "unknown --bogus"),
        (block("python -m mlx_mla.generate --prompt x --max-tokens 0"), "an integer >= 1"),
        (block("$ mlx_mla.perplexity --mode cache"), "no such console script"),
        (block("python -m mlx_mla.nosuch --x"), "no tool with a setup_arg_parser()"),
        (block("python -m mlx_mla.convert --mlx-path out"), "required: --hf-path"),
        (block("X=1 \\", "  python -m benchmarks.decode --geometry v9"), "invalid choice: 'v9'"),
        (block("echo hi | python -m mlx_mla.generate -f - --top-p 2 | head"), "--top-p"),
    ],
)
def test_a_command_the_tool_would_refuse_is_found(markdown, message):
    assert any(message in p for p in found(markdown)), found(markdown)


def test_what_runs_as_written_is_not_refused():
    markdown = "\n".join(
        [
            block(
                "python -m mlx_mla.generate -f p.txt [--attention mla|mha]",
                "       [--draft ngram | --draft-model M]",
                "mlx.launch -n 2 -- python -m mlx_mla.chat --pipeline   # two ranks; /exit ends",
            ),
            "```python\nmodel = mlx_mla.load(PATH)\n```",
            "The tools `mlx_mla.generate` and `python -m mlx_mla.convert --force` (prose may",
            "leave out a required flag), and `python -m mlx_mla.memory",
            "--config deepseek-v3`.",
        ]
    )
    commands = doc_commands(markdown, "example.md")
    assert [(c.module, c.inline) for c in commands] == [
        ("mlx_mla.generate", False),
        ("mlx_mla.chat", False),
        ("mlx_mla.convert", True),
        ("mlx_mla.memory", True),
    ]
    assert len(argvs(commands[0], setup_arg_parser("mlx_mla.generate"))) == 5
    assert found(markdown) == []


# Pages other engineers are writing at the same time as the README that links them; drop a name
# once its page is in.
PENDING_PAGES = set()


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def prose(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def anchors(page: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#+ (.+)$", prose(page.read_text()), flags=re.M)}


@pytest.mark.parametrize("page", DOC_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(page.read_text())):
        if re.match(r"\w+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if file.relative_to(ROOT).as_posix() in PENDING_PAGES and not file.exists():
            continue
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(target)
    assert broken == []


def map_paths() -> list[str]:
    """The files named in the first column of the README's "Where things are" table: a bare name
    lies in the folder of the first path in its cell."""
    section = (ROOT / "README.md").read_text().split("## Where things are", 1)[1]
    paths = []
    for row in re.findall(r"^\| (.+?) \|", section, flags=re.M)[2:]:
        names = re.findall(r"`([^`]+)`", row)
        folder = str(Path(names[0]).parent) if "/" in names[0].rstrip("/") else ""
        paths += [n if "/" in n.rstrip("/") or not folder else f"{folder}/{n}" for n in names]
    return paths


def test_the_readme_map_names_every_module_and_only_what_exists():
    paths = map_paths()
    assert [p for p in paths if not (ROOT / p).exists()] == []
    modules = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "mlx_mla").rglob("*.py")
        if p.name != "__init__.py"
    }
    assert sorted(modules - set(paths)) == []


def test_the_readme_opens_with_the_two_commands_and_stays_short():
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    assert first_block.splitlines() == [
        'pip install . && python -m mlx_mla.generate --prompt "ROMEO:" --max-tokens 40',
        'pip install -e ".[dev]" && python -m pytest -q',
    ]
    ci = (ROOT / ".ci/run").read_text().replace("pip install -q ", "pip install ")  # quieter
    assert first_block.splitlines()[1] in ci  # CI runs the test command the README gives
    assert len(readme.splitlines()) <= 300

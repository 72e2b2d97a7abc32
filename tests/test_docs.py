"""The docs say what the code does: every configuration key, every top-level JSON key, the layer
contracts and the paths they name are checked against the code, and the site builds with --strict.

Fast: one `watcherd ocr` run with the fake engine, no daemon.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import subprocess
import sys
import tomllib
import typing
from pathlib import Path

from tests.conftest import REPO, SAMPLES, run_watcherd
from watcherd.core.records import Job, Outcome
from watcherd.core.settings import Settings
from watcherd.outputs.documents import document_for

DOCS = REPO / "docs"
LAYERS = ["cli", "daemon", "cluster", "ops", "handoff", "ocr", "outputs", "work", "intake", "core"]


def section(page: str, heading: str) -> str:
    """The text of `page` under `## heading`, up to the next heading of that level."""
    text = (DOCS / page).read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def rows(text: str) -> list[list[str]]:
    """The cells of every table row in `text`, header and separator rows left out."""
    found = []
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            found.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return found[1:] if found else found


def first_column(text: str) -> list[str]:
    return [re.sub(r"^`([^`]+)`.*", r"\1", r[0]) for r in rows(text)]


def spans(text: str) -> list[str]:
    return re.findall(r"`([^`]+)`", text)


# -- configuration --------------------------------------------------------------------------


def setting_keys(cls: type = Settings, prefix: str = "") -> dict[str, typing.Any]:
    """Every key the YAML may hold, dotted, with its type hint: the dataclass fields of `Settings`,
    recursively, as the config loader walks them (`source` is no key: it says where they came from)."""
    hints = typing.get_type_hints(cls)
    keys: dict[str, typing.Any] = {}
    for f in dataclasses.fields(cls):
        if f.name == "source":
            continue
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            keys.update(setting_keys(typing.cast(type, hint), f"{prefix}{f.name}."))
        else:
            keys[f"{prefix}{f.name}"] = hint
    return keys


def test_the_configuration_reference_lists_every_key_and_no_other() -> None:
    keys = setting_keys()
    documented = first_column(section("configuration.md", "Reference"))
    assert len(documented) == len(set(documented)), "a key documented twice"
    mappings = {k for k, hint in keys.items() if typing.get_origin(hint) is dict}
    # A well-known key inside a mapping (ocr.options.line_orientation) documents its mapping's key.
    sub_keys = {k for k in documented if k not in keys and k.rsplit(".", 1)[0] in mappings}
    assert set(documented) - sub_keys == set(keys), {
        "not documented": sorted(set(keys) - set(documented)),
        "documented but not a key": sorted(set(documented) - set(keys) - sub_keys),
    }


# -- JSON -----------------------------------------------------------------------------------


def documented_keys(heading: str) -> tuple[set[str], set[str]]:
    """(keys present always, keys present only sometimes) of a table under json.md's `heading`."""
    table = rows(section("json.md", heading))
    always = {spans(r[0])[0] for r in table if r[1] == "always"}
    sometimes = {spans(r[0])[0] for r in table if r[1] != "always"}
    return always, sometimes


def assert_documented(document: dict[str, typing.Any], heading: str) -> None:
    always, sometimes = documented_keys(heading)
    assert set(document) == always, {
        "undocumented": sorted(set(document) - always - sometimes),
        "documented as always, missing": sorted(always - set(document)),
        "documented as conditional, present": sorted(set(document) & sometimes),
    }


def test_the_json_reference_matches_real_documents(tmp_path: Path) -> None:
    """`watcherd ocr` with the fake engine on a good PNG and a truncated JPEG: the top-level keys of
    the result and the error document are exactly those json.md says are always there; a page's
    keys are among those it documents."""
    good = tmp_path / "memo_en.png"
    good.write_bytes((SAMPLES / "memo_en.png").read_bytes())
    bad = tmp_path / "truncated.jpg"
    bad.write_bytes((SAMPLES / "receipt_zh.jpg").read_bytes()[:3000])
    config = tmp_path / "watcherd.yaml"
    config.write_text('ocr: {engine: "tests.engines:Echo", timeout_s: 20, auto_rotate: false}\noutput: {locale: en}\n')
    done = run_watcherd("ocr", str(good), str(bad), "--config", str(config))
    result, error = json.loads(done.stdout)
    assert (result["status"], error["status"], error["error_code"]) == ("ok", "failed", "unreadable"), done.stderr
    assert_documented(result, "Result document")
    assert_documented(error, "Error document")
    page_always, page_sometimes = documented_keys("Page fields")
    (page,) = result["pages"]
    assert page_always <= set(page) <= page_always | page_sometimes


def test_the_json_reference_matches_a_duplicate_document() -> None:
    job = Job(rel="copy.jpg", path=Path("/srv/ocr/inbox/copy.jpg"), received_at="2026-01-01T00:00:00.000+00:00")
    outcome = Outcome(job=job, ok=True, sha256="0" * 64, duplicate_of="/srv/ocr/outbox/first.jpg.json")
    document, text = document_for(outcome, settings=Settings(), received_at=job.received_at)
    assert text is None
    assert_documented(document, "Duplicate document")


# -- architecture ---------------------------------------------------------------------------


def importlinter_contracts() -> dict[str, dict[str, typing.Any]]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {c["name"]: c for c in config["contracts"]}


def test_the_architecture_page_states_the_contracts_of_pyproject() -> None:
    contracts = importlinter_contracts()
    table = {r[0]: r for r in rows(section("architecture.md", "How it is enforced")) if len(r) == 3}
    assert set(table) == set(contracts)
    for name, contract in contracts.items():
        _, kind, what = table[name]
        assert kind == f"`{contract['type']}`", name
        if contract["type"] == "layers":
            assert spans(what) == contract["layers"], name
        elif contract["type"] == "forbidden":
            sources, forbidden = what.split(" may not import ")
            assert spans(sources) == contract["source_modules"], name
            assert spans(forbidden) == contract["forbidden_modules"], name
        else:
            assert spans(what) == contract["ancestors"], name


def modules() -> list[str]:
    """Every module of the package, dotted (packages' __init__ and __main__ left out)."""
    found = []
    for path in sorted((REPO / "watcherd").rglob("*.py")):
        if path.name not in ("__init__.py", "__main__.py"):
            found.append(".".join(path.relative_to(REPO).with_suffix("").parts))
    return found


def test_the_architecture_page_names_what_no_contract_covers() -> None:
    """The modules neither kept from the child's code nor forbidden to the daemon are said."""
    contract = importlinter_contracts()["Only the child imports the child, the engines and the renderer"]
    covered = contract["source_modules"] + contract["forbidden_modules"]
    neither = {m for m in modules() if not any(m == c or m.startswith(c + ".") for c in covered)}
    text = (DOCS / "architecture.md").read_text()
    paragraph = text[text.index("Neither a source nor forbidden") :].split("\n\n", 1)[0]
    assert {s for s in spans(paragraph) if s.startswith("watcherd.")} == neither


def test_the_architecture_page_says_which_layers_import_which() -> None:
    imports: dict[str, set[str]] = {layer: set() for layer in LAYERS}
    for path in (REPO / "watcherd").rglob("*.py"):
        parts = path.relative_to(REPO / "watcherd").with_suffix("").parts
        if parts[0] not in LAYERS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                target = name.split(".")
                if target[0] == "watcherd" and len(target) > 1 and target[1] in LAYERS and target[1] != parts[0]:
                    imports[parts[0]].add(target[1])
    table = rows(section("architecture.md", "The layers"))
    documented = {spans(r[0])[0].removeprefix("watcherd."): r[1] for r in table}
    assert set(documented) == set(LAYERS)
    for layer, said in documented.items():
        named = re.findall(r"\b(" + "|".join(LAYERS) + r")\b", re.sub(r"\([^)]*\)", "", said))
        assert set(named) == imports[layer], layer


def test_the_layout_page_names_every_module() -> None:
    text = (DOCS / "layout.md").read_text()
    unnamed = [m for m in modules() if not re.search(rf"\b{m.rsplit('.', 1)[1]}\b", text)]
    assert not unnamed, "docs/layout.md says nothing of these"


# -- every page -----------------------------------------------------------------------------


def pages() -> list[Path]:
    return [REPO / "README.md", *sorted(DOCS.glob("*.md"))]


def test_paths_and_modules_named_in_the_docs_exist() -> None:
    """Repository paths (`watcherd/ocr/child/main.py`) and module names (`watcherd.outputs.render`)
    in the README and the docs name what is there."""
    missing = []
    path_re = re.compile(r"(?<![\w/.-])((?:watcherd|tests|benchmarks|scripts|systemd|config|samples|docs)/[\w./@-]*)")
    module_re = re.compile(r"(?<![\w/.-])watcherd\.(?:" + "|".join(LAYERS) + r")(?:\.\w+)*")
    for page in pages():
        text = page.read_text()
        for found in path_re.findall(text):
            if not (REPO / found.rstrip(".").split(":")[0]).exists():
                missing.append(f"{page.name}: {found}")
        for found in module_re.findall(text):
            where, rest = REPO, found.split(".")
            while rest and (where / rest[0]).is_dir():
                where, rest = where / rest[0], rest[1:]
            if rest and not (where / f"{rest[0]}.py").exists():  # a package's name: its __init__ says it
                if rest[0] not in (where / "__init__.py").read_text():
                    missing.append(f"{page.name}: {found}")
    assert not missing


def test_the_readme_keeps_its_tables_in_step_with_the_docs() -> None:
    """The README's failure table and command table are the docs' own (links aside)."""
    readme = (REPO / "README.md").read_text()

    def cells(text: str, start: str, columns: int) -> list[list[str]]:
        table = text[text.index(start) :].split("\n\n", 1)[0]
        return [[re.sub(r"\]\([^)]*\)", "]", c) for c in r[:columns]] for r in rows(table)]

    failures = (DOCS / "failures.md").read_text()
    assert cells(readme, "| what happens |", 3) == cells(failures, "| what happens |", 3)
    assert cells(readme, "| command |", 2) == cells((DOCS / "cli.md").read_text(), "| command |", 2)


def test_the_readme_stays_short() -> None:
    assert len((REPO / "README.md").read_text().splitlines()) <= 320


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    """mkdocs build --strict: every page in the nav, every link and anchor resolves."""
    mkdocs = Path(sys.executable).parent / "mkdocs"
    built = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert built.returncode == 0, built.stdout + built.stderr
    assert (tmp_path / "site" / "design" / "index.html").exists()

"""The documentation stays true: the generated configuration reference is current, the README names
every config option and stays short, and every relative link in README.md and docs/ resolves."""

import dataclasses
import re
from pathlib import Path

from dpbench import config_reference

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_BYTES = 14_000


def test_configuration_reference_is_current():
    expected = config_reference.render()
    path = ROOT / "docs" / "configuration.md"
    actual = path.read_text() if path.exists() else ""
    if actual != expected:
        old, new = actual.splitlines(), expected.splitlines()
        first = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
        got = old[first] if first < len(old) else "<end of file>"
        want = new[first] if first < len(new) else "<end of output>"
        raise AssertionError(
            f"docs/configuration.md is stale: run `make docs`. First difference, line {first + 1}:\n"
            f"  file:      {got}\n  generated: {want}"
        )


def test_conf_dir_is_the_one_dpbench_composes_from():
    conf, config_name = config_reference.conf_dir()
    assert conf == ROOT / "conf"
    assert config_name == "config"


def test_every_schema_group_has_a_table_and_every_option_a_row():
    conf, _ = config_reference.conf_dir()
    text = config_reference.render()
    groups = config_reference.schema_nodes()
    assert {"dataset", "model", "dp", "accountant", "compute"} <= set(groups)
    for group, schemas in groups.items():
        assert f"\n## {group}\n" in text
        for path in (conf / group).glob("*.yaml"):
            assert f"| `{path.stem}` |" in text, (group, path.stem)
        for _, cls, _ in schemas:
            for field in dataclasses.fields(cls):
                factory = field.default_factory
                holds_dataclass = factory is not dataclasses.MISSING and dataclasses.is_dataclass(factory())
                if not holds_dataclass:  # those get one row per nested field instead
                    assert f"| `{group}.{field.name}` |" in text, (group, field.name)
    # Nested dataclasses are flattened.
    assert "| `compute.mesh.data` | `int` | `-1` |" in text
    assert "| `compute.mesh.fsdp` | `int` | `1` |" in text


@dataclasses.dataclass
class _Mesh:
    rows: int = 2  # rows of the mesh


@dataclasses.dataclass
class _Example:
    """An example schema.

    With a ``code`` span.
    """

    plain: int = 1  # a trailing comment
    # A comment above,
    # on two lines.
    above: str = "x"  # and one after
    undocumented: float | None = None
    # Shared by the group: names alpha and beta.
    alpha: int = 0
    beta: int = 0
    gamma: int = 0  # its own

    # A group comment up to the blank line.
    first: bool = True
    second: bool = False

    mesh: _Mesh = dataclasses.field(default_factory=_Mesh)
    tags: list[str] = dataclasses.field(default_factory=lambda: ["a|b"])
    needed: str = dataclasses.field(default="")


def test_field_docs_read_comments_on_and_above_each_field():
    docs = config_reference.field_docs(_Example)
    assert docs["plain"] == "a trailing comment"
    assert docs["above"] == "A comment above, on two lines. and one after"
    assert docs["undocumented"] == ""
    assert docs["alpha"] == "Shared by the group: names alpha and beta."
    assert docs["beta"] == docs["alpha"]  # named in the block above it
    assert docs["gamma"] == "its own"
    assert docs["first"] == docs["second"] == "A group comment up to the blank line."
    assert docs["mesh"] == ""


def test_setting_rows_flatten_nested_dataclasses_and_escape_pipes():
    rows, notes = config_reference.setting_rows(_Example, "g")
    by_key = {row[0]: row for row in rows}
    assert "`g.mesh`" not in by_key  # a nested dataclass with a default gets its fields' rows only
    assert by_key["`g.mesh.rows`"] == ["`g.mesh.rows`", "`int`", "`2`", "rows of the mesh"]
    assert by_key["`g.undocumented`"][1:3] == ["`float \\| None`", "`null`"]
    assert by_key["`g.tags`"][2] == '`["a\\|b"]`'
    assert by_key["`g.needed`"][2] == '`""`'
    assert by_key["`g.first`"][2] == "`true`"
    assert notes == []
    assert config_reference.class_doc(_Example) == "An example schema.\n\nWith a `code` span."
    assert config_reference.class_doc(_Mesh) == ""  # dataclasses' generated docstring is not a doc


def test_readme_names_every_config_option_and_is_short():
    text = README.read_text()
    size = len(text.encode())
    assert size < README_MAX_BYTES, (
        f"README.md is {size} bytes; keep it under {README_MAX_BYTES} (move depth to docs/)"
    )
    conf = ROOT / "conf"
    missing = [
        str(path.relative_to(conf))
        for path in sorted(conf.rglob("*.yaml"))
        if path.parent != conf and not re.search(rf"(?<![\w-]){re.escape(path.stem)}(?![\w-])", text)
    ]
    assert not missing, f"README.md does not name these config options: {missing}"


def test_relative_links_in_readme_and_docs_resolve():
    broken = []
    for page in [README, ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = target.split("#")[0]
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, f"links to missing files: {broken}"

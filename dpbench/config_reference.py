"""``python -m dpbench.config_reference > docs/configuration.md`` (``make docs``): the settings reference.

Generated from what Hydra validates against, so it cannot drift from the code: every ``*_schema``
node that ``dpbench.config.register_configs()`` puts into Hydra's ConfigStore gives one table per
config group (setting, type, default, description; nested dataclasses flattened, e.g.
``compute.mesh.data``). The dataclass behind each node is found from the stored node itself (its
OmegaConf type), never imported by module path; each field's description is the ``# comment`` on
its line and the comment lines directly above it, read from the class's source. The options of
each group are the YAML files in ``conf/<group>/``, found the way ``python -m dpbench`` finds them
(``config_path`` of its ``hydra.main``). ``tests/test_docs.py`` fails when docs/configuration.md
differs from this output.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import inspect
import io
import json
import re
import sys
import textwrap
import tokenize
import typing
from pathlib import Path
from typing import Any

import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

SCHEMA_SUFFIX = "_schema"
# Groups composed from conf/ whose options are whole-config presets or Hydra plugins, not schemas.
PRESET_GROUPS = {
    "experiment": "`python -m dpbench +experiment=<name>`: a whole job (`# @package _global_`).",
    "sweep": "`python -m dpbench -m +sweep=<name>`: a grid (`hydra.sweeper.params`).",
    "hydra/launcher": "`python -m dpbench -m hydra/launcher=<name> ...`: where the jobs of a sweep run.",
}


def conf_dir() -> tuple[Path, str]:
    """conf/ and the root config name, read from ``hydra.main`` in ``dpbench/__main__.py`` (not run)."""
    spec = importlib.util.find_spec("dpbench.__main__")
    if spec is None or spec.origin is None:
        raise RuntimeError("dpbench.__main__ not found")
    main_file = Path(spec.origin)
    for node in ast.walk(ast.parse(main_file.read_text())):
        if isinstance(node, ast.Call) and ast.unparse(node.func) in ("hydra.main", "main"):
            kwargs = {k.arg: k.value for k in node.keywords}
            if "config_path" in kwargs:
                path = ast.literal_eval(kwargs["config_path"])
                name = ast.literal_eval(kwargs.get("config_name", ast.Constant("config")))
                return (main_file.parent / path).resolve(), name
    raise RuntimeError(f"no hydra.main(config_path=...) in {main_file}")


def schema_nodes() -> dict[str, list[tuple[str, type, Any]]]:
    """group -> [(schema name, dataclass, stored node)] for every ``*_schema`` node in the ConfigStore."""
    from dpbench.config import register_configs

    register_configs()
    out: dict[str, list[tuple[str, type, Any]]] = {}

    def walk(tree: dict, prefix: str) -> None:
        for key, value in tree.items():
            if isinstance(value, dict):
                if prefix or key != "hydra":  # Hydra's own config is not dpbench's
                    walk(value, f"{prefix}{key}/")
                continue
            name = key.removesuffix(".yaml")
            if not prefix or not name.endswith(SCHEMA_SUFFIX):
                continue
            node = value.node
            cls = OmegaConf.get_type(node) or node._metadata.object_type
            if not dataclasses.is_dataclass(cls):
                raise RuntimeError(f"{prefix}{key}: stored node is not a dataclass ({cls!r})")
            out.setdefault(prefix.rstrip("/"), []).append((name, cls, node))

    walk(ConfigStore.instance().repo, "")
    return out


# -- field descriptions from source -----------------------------------------------------------------


def _comment_text(token: str) -> str:
    return token.lstrip("#").strip()


def field_docs(cls: type) -> dict[str, str]:
    """Each field's description: its trailing ``# comment`` and the comment lines directly above it.

    A comment block above a field also describes the uncommented fields right after it when it names
    them, or when they run on to a blank line or the end of the class (a comment over a group).
    """
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    standalone: dict[int, str] = {}
    trailing: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row = tok.start[0]
            if tok.line.strip().startswith("#"):
                standalone[row] = _comment_text(tok.string)
            else:
                trailing[row] = _comment_text(tok.string)
    classdef = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef))

    docs: dict[str, str] = {}
    segment: dict[str, Any] | None = None  # a leading comment block and the uncommented fields after it

    def flush(ended_at_gap: bool) -> None:
        if segment is None:
            return
        for name in segment["pending"]:
            if ended_at_gap or re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", segment["text"]):
                docs[name] = segment["text"]

    prev_end = 0
    for stmt in classdef.body:
        first = stmt.lineno
        leading: list[str] = []
        row = first - 1
        while row in standalone:
            leading.insert(0, standalone[row])
            row -= 1
        start = row + 1  # first line of the statement including its comment block
        gap = any(not lines[i - 1].strip() for i in range(prev_end + 1, start))
        prev_end = stmt.end_lineno or first
        is_field = isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
        if gap or not is_field:
            flush(ended_at_gap=gap)
            segment = None
        if not is_field:
            continue
        name = stmt.target.id
        own = leading + [trailing[r] for r in range(first, prev_end + 1) if r in trailing]
        if own:
            flush(ended_at_gap=False)
            segment = {"text": " ".join(leading), "pending": []} if leading else None
            docs[name] = " ".join(own)
        else:
            docs[name] = ""
            if segment is not None:
                segment["pending"].append(name)
    flush(ended_at_gap=True)
    return docs


def class_doc(cls: type) -> str:
    doc = cls.__dict__.get("__doc__")
    if not doc or doc.startswith(f"{cls.__name__}("):  # dataclasses' generated signature
        return ""
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(" ".join(p.split()) for p in paragraphs).replace("``", "`")


# -- rendering --------------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("``", "`").replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    return f"`{_cell(text)}`" if text else ""


def format_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, ensure_ascii=False, separators=(", ", ": "), default=str)
    return repr(value)


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, str):
        return annotation
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _nested_dataclass(cls: type, field: dataclasses.Field, node: Any) -> type | None:
    """The dataclass a field holds (also behind ``X | None``), if any."""
    try:
        hint = typing.get_type_hints(cls).get(field.name)
    except Exception:  # an annotation that cannot be resolved: ask the stored node
        hint = None
    candidates = [hint, *typing.get_args(hint)] if hint is not None else []
    for candidate in candidates:
        if dataclasses.is_dataclass(candidate):
            return candidate
    child = _child(node, field.name)
    ref = child._metadata.ref_type if child is not None else None
    return ref if dataclasses.is_dataclass(ref) else None


def _child(node: Any, name: str) -> Any:
    """The stored node of one field (None when the node holds none, e.g. a null nested dataclass)."""
    if not isinstance(node, DictConfig) or node._is_none() or node._is_missing():
        return None
    return node._get_node(name)


def _default(field: dataclasses.Field) -> tuple[bool, Any]:
    if field.default is not dataclasses.MISSING:
        return True, field.default
    if field.default_factory is not dataclasses.MISSING:
        return True, field.default_factory()
    return False, None


def setting_rows(cls: type, prefix: str, node: Any = None) -> tuple[list[list[str]], list[str]]:
    """Table rows for ``cls``'s fields under ``prefix`` and the docstrings of nested dataclasses."""
    rows: list[list[str]] = []
    notes: list[str] = []
    docs = field_docs(cls)
    for field in dataclasses.fields(cls):
        key = f"{prefix}.{field.name}"
        has_default, default = _default(field)
        nested = _nested_dataclass(cls, field, node)
        if nested is None or not dataclasses.is_dataclass(default):
            shown = _code(format_value(default)) if has_default else "required"
            rows.append([_code(key), _code(_type_name(field.type)), shown, _cell(docs.get(field.name, ""))])
        if nested is not None:
            nested_rows, nested_notes = setting_rows(nested, key, _child(node, field.name))
            rows += nested_rows
            if class_doc(nested):
                notes.append(f"`{key}` ({nested.__name__}): {class_doc(nested)}")
            notes += nested_notes
    return rows, notes


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(row) + " |" for row in rows]


def flatten(mapping: dict, prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            items += flatten(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def read_option(path: Path) -> tuple[str | None, list[tuple[str, Any]]]:
    """An option file's schema (its ``defaults`` entry ending in ``_schema``) and the values it sets."""
    data = yaml.safe_load(path.read_text()) or {}
    schema = None
    for entry in data.pop("defaults", []) or []:
        if isinstance(entry, str) and entry.endswith(SCHEMA_SUFFIX):
            schema = entry
    return schema, flatten(data)


def root_config(conf: Path, config_name: str) -> tuple[dict[str, str], list[tuple[str, Any]]]:
    """The root config's option per group and the settings it sets itself (Hydra's own excluded)."""
    data = yaml.safe_load((conf / f"{config_name}.yaml").read_text()) or {}
    chosen = {}
    for entry in data.pop("defaults", []) or []:
        if isinstance(entry, dict):
            chosen.update({str(k): str(v) for k, v in entry.items()})
    data.pop("hydra", None)
    return chosen, flatten(data)


def options(conf: Path, group: str) -> list[Path]:
    return sorted((conf / group).glob("*.yaml"))


def render() -> str:
    conf, config_name = conf_dir()
    defaults, root_sets = root_config(conf, config_name)
    # A stable order, whatever order the modules declare their schemas in: the root config's groups
    # first, as it lists them, then any other group; the schemas of a group by name.
    stored = schema_nodes()
    order = [g for g in defaults if g in stored] + sorted(set(stored) - set(defaults))
    groups = {g: sorted(stored[g], key=lambda item: item[0]) for g in order}
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m dpbench.config_reference` (`make docs`) from the config schemas",
        "     and conf/; do not edit by hand: tests/test_docs.py fails when this file is stale. -->",
        "",
        f"Hydra composes `conf/{config_name}.yaml` from one option per group; an option is a YAML file",
        "`conf/<group>/<option>.yaml` whose `defaults` names the schema (a dataclass) it is checked",
        "against, in struct mode: a misspelt key is an error. Choose an option with `<group>=<option>`",
        "and override one setting with `<group>.<field>=<value>`, e.g.",
        "`python -m dpbench dp=bandmf dp.bands=8 compute.mesh.fsdp=2`. Descriptions are the comments",
        "on each field in the code.",
        "",
        "The *default* column is the schema's; an option file sets its own values (its *sets* column),",
        f"and `conf/{config_name}.yaml` sets these for the default job: "
        + ", ".join(f"`{k}={format_value(v)}`" for k, v in root_sets)
        + ".",
        "",
        "Groups: " + ", ".join(f"[`{g}`](#{g.replace('/', '')})" for g in groups) + ".",
    ]
    for group, schemas in groups.items():
        out += ["", f"## {group}", ""]
        default = defaults.get(group)
        opts = options(conf, group)
        out.append(
            f"Options (`{group}=<option>`, files in `conf/{group}/`)"
            + (f"; the default is `{default}`:" if default else ":")
        )
        out.append("")
        option_rows = []
        for path in opts:
            schema, values = read_option(path)
            sets = ", ".join(f"{k}={format_value(v)}" for k, v in values)
            option_rows.append([_code(path.stem), _code(schema or ""), _code(sets) if sets else ""])
        out += table(["option", "schema", "sets"], option_rows)
        for schema_name, cls, node in schemas:
            rows, notes = setting_rows(cls, group, node)
            title = f"### `{schema_name}` ({cls.__name__})" if len(schemas) > 1 else ""
            out += ["", title, ""] if title else [""]
            if class_doc(cls):
                out += [class_doc(cls), ""]
            for note in notes:
                out += [note, ""]
            out += table(["setting", "type", "default", "description"], rows)
    out += ["", "## Presets and launchers", ""]
    for group, how in PRESET_GROUPS.items():
        names = [p.stem for p in options(conf, group)]
        if not names:
            continue
        listed = ", ".join(f"[`{n}`](../conf/{group}/{n}.yaml)" for n in names)
        out += [f"- `{group}`: {how} Options: {listed}.", ""]
    while out and out[-1] == "":
        out.pop()
    return "\n".join(out) + "\n"


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()

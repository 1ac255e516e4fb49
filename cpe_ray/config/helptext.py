"""Each schema field's help text, read from the docstring under it, and the YAML that shows it.

The string right under a field in `schema*.py` (as CleanRL documents its arguments) is that
field's help: a first paragraph of one line saying what it is and its unit, then any detail.
`commented_yaml` writes a config with that text as comments above every key; `cpe-ray config`
prints it, and `conf/default.yaml` is what it prints for the defaults.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
from typing import Any

from omegaconf import OmegaConf

from cpe_ray.config.schema import Config

YAML_WIDTH = 100
HEADER = """\
# cpe-ray's configuration, resolved, with each key's help above it (the docstrings of
# cpe_ray/config/schema.py). For the defaults, the offline CPU run, this is conf/default.yaml:
# regenerate it with `cpe-ray config > conf/default.yaml` (tests/config checks that it is).
"""


def field_docs(schema: type) -> dict[str, str]:
    """{field name: docstring} of a schema dataclass; a subclass's own docstrings win."""
    docs: dict[str, str] = {}
    for klass in reversed(schema.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return docs


@functools.cache
def _own_field_docs(klass: type) -> dict[str, str]:
    node = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0]
    assert isinstance(node, ast.ClassDef)
    docs = {}
    for stmt, after in zip(node.body, node.body[1:], strict=False):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


def schema_help(schema: type = Config, prefix: str = "") -> dict[str, str]:
    """{"section.key": first line of its docstring} for every section and key of the schema."""
    docs = field_docs(schema)
    out: dict[str, str] = {}
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        out[key] = " ".join(docs.get(f.name, "").split("\n\n")[0].split())
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            out.update(schema_help(type(default), key + "."))
    return out


def commented_yaml(cfg: Config) -> str:
    """`cfg` as YAML (the same as `config_to_yaml`) with each key's docstring above it."""
    return HEADER + "".join(_lines(cfg, ""))


def _lines(obj: Any, pad: str) -> Any:
    docs = field_docs(type(obj))
    for f in dataclasses.fields(obj):
        if not pad:
            yield "\n"  # a blank line before each section
        for paragraph in docs.get(f.name, "").split("\n\n"):
            for line in textwrap.wrap(" ".join(paragraph.split()), YAML_WIDTH - len(pad) - 2,
                                      break_long_words=False, break_on_hyphens=False):
                yield f"{pad}# {line}\n"
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield f"{pad}{f.name}:\n"
            yield from _lines(value, pad + "  ")
        else:
            yield textwrap.indent(OmegaConf.to_yaml({f.name: value}), pad)

"""Prompt templates: text files with `{name}` placeholders, loaded by name or path.

Templates live under `conf/prompts/` so users can swap them without touching code. A
template may only use the placeholders its caller provides and must use the required
ones; both are checked when the template is loaded, before any actor starts. Only
`{identifier}` is a placeholder, so JSON-like braces in a template are left alone.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Set
from dataclasses import dataclass

from cpe_ray.errors import TemplateError
from cpe_ray.paths import PROMPTS_DIR, resolve_path

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class PromptTemplate:
    """A loaded template and where it came from (for error messages)."""

    text: str
    source: str

    @property
    def placeholders(self) -> frozenset[str]:
        return frozenset(_PLACEHOLDER.findall(self.text))

    def check(self, allowed: Set[str], required: Set[str]) -> None:
        unknown = self.placeholders - set(allowed)
        if unknown:
            raise TemplateError(
                f"template {self.source} uses unknown placeholder(s) "
                f"{', '.join('{' + u + '}' for u in sorted(unknown))}; "
                f"allowed: {', '.join('{' + a + '}' for a in sorted(allowed))}"
            )
        missing = set(required) - self.placeholders
        if missing:
            raise TemplateError(
                f"template {self.source} lacks required placeholder(s) "
                f"{', '.join('{' + m + '}' for m in sorted(missing))}; add them to the template"
            )

    def renamed(self, names: Mapping[str, str]) -> PromptTemplate:
        """The same template with placeholders renamed (`{old}` -> `{new}` for each entry):
        a prompt written for other code's placeholder names then renders with ours."""

        def sub(match: re.Match[str]) -> str:
            return "{" + names.get(match.group(1), match.group(1)) + "}"

        return PromptTemplate(text=_PLACEHOLDER.sub(sub, self.text), source=self.source)

    def line_of(self, fragment: str) -> int:
        """1-based line of the first occurrence of `fragment` (1 if absent), for messages."""
        at = self.text.find(fragment)
        return self.text.count("\n", 0, at) + 1 if at >= 0 else 1

    def render(self, **values: str) -> str:
        """Substitute placeholders in one pass, so values containing braces stay verbatim."""

        def sub(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in values:
                raise TemplateError(f"template {self.source}: no value for {{{name}}}")
            return str(values[name])

        return _PLACEHOLDER.sub(sub, self.text)


def load_template(
    name_or_path: str,
    allowed: set[str] | frozenset[str],
    required: set[str] | frozenset[str] = frozenset(),
) -> PromptTemplate:
    """Load a template by file name under conf/prompts/ or by path, and check placeholders."""
    candidates = [resolve_path(name_or_path), PROMPTS_DIR / name_or_path]
    for cand in candidates:
        if cand.is_file():
            tpl = PromptTemplate(text=cand.read_text(encoding="utf-8"), source=str(cand))
            tpl.check(allowed, required)
            return tpl
    shipped = ", ".join(sorted(p.name for p in PROMPTS_DIR.glob("*.txt")))
    raise TemplateError(
        f"prompt template '{name_or_path}' not found (looked in the working directory and "
        f"{PROMPTS_DIR}); shipped templates: {shipped or 'none'}"
    )

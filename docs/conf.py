"""Sphinx configuration of the optax_neuron documentation (``make docs``).

The site is built the way Optax and Flax build theirs: Markdown pages and the executed
notebooks through myst-nb (stored outputs, never re-executed), an API reference generated
from the docstrings (autosummary, autodoc, Napoleon for the Google style) and the
sphinx-book-theme.

Two things are generated at every build, into git-ignored folders of ``docs/``:

* ``api/``: one page per public module of ``optax_neuron`` (found by walking the package,
  so a new module or a new name in a module's ``__all__`` appears without editing this
  file), each with the module docstring and an autosummary table of its ``__all__``;
* ``notebooks/``: copies of the executed ``notebooks/*.ipynb`` of the repository.

Intersphinx links to Python, NumPy, JAX, Optax and Flax when their inventories can be
fetched; offline (no network at build time) the unreachable ones are left out and
references into those projects are rendered as plain code, so the build stays free of
warnings either way. ``DOCS_OFFLINE=1`` skips the reachability check.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import sys
import typing
import urllib.request
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from sphinx.ext.napoleon.docstring import GoogleDocstring  # noqa: E402

import optax_neuron  # noqa: E402

project = "optax_neuron"
author = "optax_neuron developers"
copyright = "optax_neuron developers"
release = version = optax_neuron.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx_copybutton",
]

templates_path = ["_templates"]
exclude_patterns = [
    "_build",
    "_templates",
    "README.md",
    "Thumbs.db",
    ".DS_Store",
    "**.ipynb_checkpoints",
]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}

# ----------------------------------------------------------------------- MyST and notebooks
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # the notebooks carry the outputs of a full run (make notebooks)
nb_merge_streams = True

# ----------------------------------------------------------------------- API reference
autosummary_generate = True
autosummary_ignore_module_all = False
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
# Type aliases stay names in signatures instead of their expansion (a FanIn is a union of five
# forms, an optax.ScalarOrSchedule a union of arrays and callables).
autodoc_type_aliases = {
    name: name
    for name in (
        "FanIn",
        "AxesTree",
        "Axes",
        "Rule",
        "SigmaSpec",
        "ArrayLike",
        "jax.typing.ArrayLike",
        "optax.ScalarOrSchedule",
        "optax.Params",
        "optax.Updates",
        "optax.OptState",
        "chex.ArrayTree",
        "chex.Numeric",
    )
}
autodoc_member_order = "bysource"
autodoc_inherit_docstrings = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
add_module_names = False
nitpicky = True


def _attribute_docstring_as_written(self: GoogleDocstring) -> list[str]:
    return self.__class__(self._consume_to_end(), self._config).lines()


# Napoleon reads the first line of a data or attribute docstring as ``type: description``.
# This project writes sentences there ("Every axis but the first: out-first layouts"), and
# the types come from annotations, so such docstrings are kept as written.
GoogleDocstring._parse_attribute_docstring = _attribute_docstring_as_written  # type: ignore[method-assign]

# ----------------------------------------------------------------------- intersphinx
INVENTORIES = {
    "python": "https://docs.python.org/3",
    "numpy": "https://numpy.org/doc/stable",
    "jax": "https://docs.jax.dev/en/latest",
    "optax": "https://optax.readthedocs.io/en/latest",
    "flax": "https://flax.readthedocs.io/en/latest",
}


def _reachable(url: str) -> bool:
    if os.environ.get("DOCS_OFFLINE"):
        return False
    try:
        with urllib.request.urlopen(url + "/objects.inv", timeout=3) as response:
            return bool(response.status == 200)
    except Exception:
        return False


intersphinx_mapping = {name: (url, None) for name, url in INVENTORIES.items() if _reachable(url)}
intersphinx_timeout = 5

# Names of other projects (in signatures and docstrings). With their inventory they link;
# without it (offline) they stay plain code instead of failing the nitpicky build.
_EXTERNAL = {
    "python": r"(builtins|typing|collections|collections\.abc|types|pathlib|os|argparse"
    r"|enum|abc|dataclasses|fnmatch|importlib|importlib\.util|pickle|json|signal)\.\w+|(Any|Callable|Sequence|Mapping|Iterable|Iterator|NamedTuple"
    r"|Path|Literal|Optional|Union|TypeAlias|Protocol|TextIO|ModuleType|Namespace)",
    "numpy": r"(numpy|np)\.\w+.*",
    "jax": r"(jax|jaxlib|jnp|lax)\.\w+.*|Array|ArrayLike|PRNGKeyArray|KeyArray|Mesh",
    "optax": r"(optax|chex)\.\w+.*|GradientTransformation\w*|Params|Updates|OptState"
    r"|ArrayTree|Schedule|ScalarOrSchedule|Numeric|PyTree",
    "flax": r"(flax|nnx)\.\w+.*|orbax\.\w+.*|tensorboardX\.\w+.*",
}
# Intersphinx resolves what it can first; the ignore list only silences what is left, so a
# name missing from another project's inventory (chex has none) never fails the build.
nitpick_ignore_regex = [(r"py:.*", pattern) for pattern in _EXTERNAL.values()]
# optax and flax re-export names from private modules (optax._src..., flax.nnx.xxx); their
# inventories list only the public spelling, so private spellings stay plain code.
nitpick_ignore_regex += [(r"py:.*", r"(optax\._src|flax\.nnx\.\w+|jax\._src|chex\._src)\..*")]
# A dataclass field annotated `tuple[str, ...] | None` reaches the resolver cut at the comma.
nitpick_ignore_regex += [("py:class", r"tuple\[str")]

# ----------------------------------------------------------------------- HTML
html_theme = "sphinx_book_theme"
html_title = f"optax_neuron {version}"
html_theme_options = {
    "show_toc_level": 2,
    "repository_branch": "main",
    "path_to_docs": "docs",
    "home_page_in_toc": True,
    # The sidebar opens the branch of the page shown, not all 180-odd pages of the API
    # reference on every page: the build takes 17 s instead of 37 s (the theme renders the
    # whole navigation tree into each page).
    "collapse_navbar": True,
}
html_static_path: list[str] = []
html_last_updated_fmt = ""

# ----------------------------------------------------------------------- generated pages
# Modules listed first appear first; every other public module follows by name.
MODULE_ORDER = [
    "optax_neuron.fan_in",
    "optax_neuron.neuron_mean",
    "optax_neuron.neuron_adam",
    "optax_neuron.grad_stats",
    "optax_neuron.tensorboard",
    "optax_neuron.rso",
    "optax_neuron.mnist",
]
SKIP_MODULES = {"optax_neuron.mnist.__main__"}


def public_modules() -> list[str]:
    """Every importable submodule of optax_neuron whose path has no ``_`` part."""
    names = [
        info.name
        for info in pkgutil.walk_packages(optax_neuron.__path__, "optax_neuron.")
        if not any(part.startswith("_") for part in info.name.split("."))
        and info.name not in SKIP_MODULES
    ]

    def key(name: str) -> tuple[int, str]:
        for rank, head in enumerate(MODULE_ORDER):
            if name == head or name.startswith(head + "."):
                return rank, name
        return len(MODULE_ORDER), name

    return sorted(names, key=key)


def _summary(obj: object) -> str:
    """The first paragraph of a docstring, on one line (reST, complete markup)."""
    doc = (inspect.getdoc(obj) or "").strip()
    return " ".join(doc.split("\n\n")[0].split())


TOP_LEVEL: dict[str, str] = {}  # top-level name -> the full name it is documented under
ALL_DOCUMENTED: list[str] = []  # every full name documented


def write_api_pages() -> None:
    """``api/index.md`` and one page per public module (see the module docstring)."""
    out = DOCS / "api"
    out.mkdir(exist_ok=True)
    written = {out / "index.md"}
    documented: dict[int, str] = {}  # id(object) -> the full name it is documented under
    pages = []
    for modname in public_modules():
        module = importlib.import_module(modname)
        if hasattr(module, "__all__"):
            names = [n for n in module.__all__ if not n.startswith("__")]
        else:  # a module without __all__: the public names it defines, and its type aliases
            names = [
                n
                for n, obj in vars(module).items()
                if not n.startswith("_")
                and (
                    (
                        (inspect.isclass(obj) or inspect.isfunction(obj))
                        and obj.__module__ == modname
                    )
                    or typing.get_origin(obj) is not None
                )
            ]
        fresh, seen = [], []
        for name in names:
            obj = getattr(module, name)
            if inspect.ismodule(obj):
                continue
            if id(obj) in documented and not isinstance(obj, (str, int, float, tuple, list)):
                seen.append((name, documented[id(obj)]))
            else:
                fresh.append(name)
                documented.setdefault(id(obj), f"{modname}.{name}")
        lines = [
            f"# {modname}",
            "",
            "```{eval-rst}",
            f".. automodule:: {modname}",
            "   :no-members:",
            "```",
            "",
        ]
        if fresh:
            lines += [
                "## Public names",
                "",
                "```{eval-rst}",
                f".. currentmodule:: {modname}",
                "",
                ".. autosummary::",
                "   :toctree: _autosummary",
                "   :nosignatures:",
                "",
                *[f"   {name}" for name in fresh],
                "```",
                "",
            ]
        if seen:
            lines += ["Also exported here:", ""]
            lines += [f"- `{name}`: {{py:obj}}`{target}`" for name, target in seen]
            lines.append("")
        _write(out / f"{modname}.md", "\n".join(lines))
        written.add(out / f"{modname}.md")
        pages.append(modname)

    ALL_DOCUMENTED.extend(documented.values())
    top = []
    for name in optax_neuron.__all__:
        if name.startswith("__"):
            continue
        obj = getattr(optax_neuron, name)
        if inspect.ismodule(obj):
            top += [f"   * - :py:mod:`optax_neuron.{name} <{obj.__name__}>`", "     - module"]
        elif id(obj) in documented:
            top += [
                f"   * - :py:obj:`optax_neuron.{name} <{documented[id(obj)]}>`",
                f"     - {_summary(obj)}",
            ]
            TOP_LEVEL[name] = documented[id(obj)]
        else:
            raise RuntimeError(
                f"optax_neuron.{name} is public but in no public module's __all__: "
                "add it to the __all__ of the module that defines it"
            )
    index = [
        "# API reference",
        "",
        "Generated from the docstrings. `import optax_neuron as on` gives every name of the",
        "first table; the modules below hold them and the rest of the public API (rule presets,",
        "state classes, the MNIST application).",
        "",
        "## Top-level names",
        "",
        "```{eval-rst}",
        ".. list-table::",
        "   :header-rows: 1",
        "   :widths: 35 65",
        "",
        "   * - name",
        "     - what it is (each links to its page in the module that defines it)",
        *top,
        "```",
        "",
        "## Modules",
        "",
        "```{toctree}",
        ":maxdepth: 1",
        "",
        *pages,
        "```",
        "",
    ]
    _write(out / "index.md", "\n".join(index))
    for stale in set(out.glob("*.md")) - written:  # a module that is gone
        stale.unlink()


def _write(path: Path, text: str) -> None:
    """Write only what changed, so that a second build reads only the changed pages."""
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def copy_notebooks() -> None:
    """The executed notebooks of the repository, rendered with their stored outputs."""
    out = DOCS / "notebooks"
    out.mkdir(exist_ok=True)
    sources = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    for notebook in sources:
        _write(out / notebook.name, notebook.read_text())
    for stale in set(out.glob("*.ipynb")) - {out / n.name for n in sources}:
        stale.unlink()


write_api_pages()
copy_notebooks()


def _resolve(app, env, node, contnode):  # type: ignore[no-untyped-def]
    """Python references that Sphinx cannot find by itself, resolved to the documented name.

    ``optax_neuron.X`` for a top-level name ``X`` (documented in its module), and a bare
    ``X`` written in one module's docstring for a public name of another module of the
    package (``LayerStack`` in ``optax_neuron.rso.evaluators``), when exactly one documented
    object is called ``X``.
    """
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip("~.")
    name = target.removeprefix("optax_neuron.")
    full = None
    if name != target and name in TOP_LEVEL:
        full = TOP_LEVEL[name]
    elif name == target:  # "LayerStack" or "LayerStack.rows"
        head, _, rest = target.partition(".")
        matches = {f for f in ALL_DOCUMENTED if f.rsplit(".", 1)[1] == head}
        full = (matches.pop() + (f".{rest}" if rest else "")) if len(matches) == 1 else None
    if full is None:
        return None
    domain = env.get_domain("py")
    for role in (node["reftype"], "obj"):
        found = domain.resolve_xref(env, node["refdoc"], app.builder, role, full, node, contnode)
        if found is not None:
            return found
    return None


def _skip_namedtuple_fields(app, what, name, obj, skip, options):  # type: ignore[no-untyped-def]
    """The fields of a state NamedTuple are documented by its ``Attributes:`` section."""
    if what == "class" and type(obj).__name__ == "_tuplegetter":
        return True
    return None


def setup(app):  # type: ignore[no-untyped-def]
    app.connect("autodoc-skip-member", _skip_namedtuple_fields)
    app.connect("missing-reference", _resolve)

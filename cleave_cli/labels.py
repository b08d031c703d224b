"""Class names for model outputs: ``cleave infer --labels imagenet`` or ``--labels FILE``."""

from __future__ import annotations

from pathlib import Path

IMAGENET = "imagenet"


def load_labels(source: str) -> list[str]:
    """Class names, index ``i`` naming output ``i``.

    ``"imagenet"``: the 1000 ImageNet-1k classes, from the metadata torchvision ships with its weight
    enums (nothing is downloaded); otherwise a text file with one name per line.

    Raises:
        ValueError: the file cannot be read or holds no name.
    """
    if source == IMAGENET:
        return imagenet_categories()
    try:
        names = [line.strip() for line in Path(source).read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--labels: cannot read {source!r} ({exc})") from exc
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"--labels: {source!r} holds no class name")
    return names


def name_of(labels: list[str] | None, index: int) -> str | None:
    """The name of class ``index``, or None without labels or past their end."""
    return labels[index] if labels is not None and 0 <= index < len(labels) else None


def imagenet_categories() -> list[str]:
    """The ImageNet-1k class names torchvision ships (``torchvision.models._meta``), read without
    importing torchvision: importing it would load torch, seconds that ``cleave infer`` need not pay."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("torchvision")  # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "--labels imagenet: the names come from torchvision, which is not installed "
            "(the torch-free edge): give --labels FILE, one class name per line, line i naming class i"
        )
    meta = Path(next(iter(spec.submodule_search_locations))) / "models" / "_meta.py"
    try:
        tree = ast.parse(meta.read_text())
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"--labels imagenet: cannot read {meta} ({exc})") from exc
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_IMAGENET_CATEGORIES" for t in node.targets):
            names = ast.literal_eval(node.value)
            if isinstance(names, list) and len(names) == 1000 and all(isinstance(n, str) for n in names):
                return names
    raise ValueError(f"--labels imagenet: {meta} holds no list of 1000 ImageNet class names")

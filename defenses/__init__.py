"""Built-in defenses; importing this package registers them in bench.registry.DEFENSES."""
from defenses import undefended  # noqa: F401

"""Built-in defenses; importing this package registers them in bench.core.registry.DEFENSES."""
from defenses import undefended  # noqa: F401
from defenses import madry  # noqa: F401
from defenses import convex  # noqa: F401
from defenses import pixeldp  # noqa: F401
from defenses import user_model  # noqa: F401
from defenses import smoothing  # noqa: F401

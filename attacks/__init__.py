"""Built-in attacks; importing this package registers them in bench.core.registry.ATTACKS."""
from attacks import pgd  # noqa: F401
from attacks import adapters, apgd, apgd_l1, cw, cw_linf, variants  # noqa: F401

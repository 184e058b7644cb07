"""The core: types, registries, the Defense base class, data, models, weights and the numerics that attacks/ and
defenses/ may import (nothing here imports a layer above it).
"""

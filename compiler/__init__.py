"""Universal Image Worker compiler: recipe -> pinned, validated, cached artifact.

Build time only: may use Hydra, the network and torch. The runtime never imports this package.
"""

# Bump by hand whenever the compiler would produce different artifact bytes for the same inputs;
# it enters every cache_key, so a bump rebuilds everything once.
COMPILER_REVISION = "1"

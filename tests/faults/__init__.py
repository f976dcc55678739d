"""The randomized fault run of issue 12: two operator replicas on the sandbox, faults injected
from a seeded RNG, invariants judged from outside the operator (``checks``, pure) over evidence
gathered by ``run``."""

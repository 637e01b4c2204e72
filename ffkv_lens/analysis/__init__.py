"""The analysis core: everything here sees models only through ``MemoryAdapter``.

- :mod:`ffkv_lens.analysis.triggers`: streaming top-k trigger search (paper section 3).
- :mod:`ffkv_lens.analysis.atlas`: the trigger atlas and its storage.
- :mod:`ffkv_lens.analysis.checkpoint`: resumable search state.
"""

from ffkv_lens.analysis.agreement import AgreementResult, value_agreement  # noqa: F401
from ffkv_lens.analysis.dynamics import composition, layer_dynamics, residual_agreement  # noqa: F401
from ffkv_lens.analysis.mutation import MutationConfig, MutationResult, mutation_test  # noqa: F401

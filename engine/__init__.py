# OpenMP threads that wait for work sleep instead of spinning: on a machine shared with
# loader workers or other jobs, spinning threads made the step up to ~10x slower. libgomp
# reads this when torch loads it, so it is set before anything here imports torch.
import os as _os

_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

"""Code the tests share: shard sets and toy episodes, the toy trainer and the launcher stand-in,
tiny models, the SLURM helpers, the headless browser. Test files import from here (`from helpers.X
import ...`: pytest puts tests/ on sys.path, and job processes get it through PYTHONPATH), never
from one another; tests/test_test_imports.py fails if a test file imports another. Fixtures that
many files use live in tests/conftest.py."""

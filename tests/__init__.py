"""The test suite. Importing it first drops the developer's `QS_*` settings (see `tests.support.env`),
before any project module reads the environment."""

from tests.support.env import drop_leaked_settings

drop_leaked_settings()

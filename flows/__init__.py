"""Prefect flows: thin wrappers over the plain stage functions of pipeline/.

Defaults for hospital networks, set before Prefect is imported (a user's environment wins):
no telemetry of any kind (the machines are offline, Prefect would log a failed send at every
start, and a hospital does not want a process calling out): the server's anonymous usage
analytics (PREFECT_SERVER_ANALYTICS_ENABLED), the client SDK's (DO_NOT_TRACK, the standard
Prefect reads) and run telemetry to Prefect Cloud (PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY);
and
warnings only (the progress bar and the cohort table are what a user reads), and a patient
start of the local ephemeral API server: its 20 s default timed out on a loaded 2-core machine
(a batch then dies before its first study).
"""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

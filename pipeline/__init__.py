"""ablation-response: MRI follow-up after percutaneous ablation, study by study."""

__version__ = "0.3.5"
SCHEMA_VERSION = 1

"""ablation-response: MRI follow-up after percutaneous ablation, study by study."""

__version__ = "0.2.0"
SCHEMA_VERSION = 1

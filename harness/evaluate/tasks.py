"""The seven zero-shot tasks, their names in the papers' tables and the metric each contributes
to the average (no heavy imports: the collector and the schema read these without lm-eval)."""

TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
# LLM-Pruner's table convention: acc for BoolQ, PIQA, WinoGrande, ARC-e; acc_norm for the rest.
DEFAULT_AVERAGE_METRICS = {"boolq": "acc", "piqa": "acc", "hellaswag": "acc_norm", "winogrande": "acc",
                           "arc_easy": "acc", "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}
PAPER_NAMES = {"boolq": "BoolQ", "piqa": "PIQA", "hellaswag": "HellaSwag", "winogrande": "WinoGrande",
               "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "openbookqa": "OBQA"}

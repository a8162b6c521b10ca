"""The few-shot evaluation harness (docs/evaluation.md): data preparation for CHAOS, Synapse and
Decathlon-style folders, the RPT "EP1" protocol and a realistic variant, training-free baselines,
metrics and reports."""

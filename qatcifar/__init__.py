"""The library of the toolkit's commands (train.py, eval.py, export.py, ... at the project's root): one job a
module. docs/architecture.md says which module owns which concern. Importing the package imports nothing else."""

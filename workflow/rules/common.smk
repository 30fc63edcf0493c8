# Paths, arguments and resources of every rule come from a2mim.workflow.Matrix, built from the
# validated config (which also checks that runs, datasets, inits and table cells exist). Rules
# stay thin: named inputs/outputs and one `a2mim` command.

from a2mim.workflow import FIGURES, STAGES, TABLES, Matrix, expose_cli, name_pattern, per_run

expose_cli()
M = Matrix(config)
M.preflight(dry_run=workflow.output_settings.dryrun)  # every run's stage command resolves and validates
RESULTS = M.results
EXPERIMENT = M.experiment
M.check_chains()  # each run's backbone family is the one its init run trains (BEiT vs plain ViT)
CONDA_ENV = "../../envs/a2mim.yaml"

# a2mim: pretrain -> fine-tune / linear probe -> COCO / ADE20K transfer -> analysis -> tables.
#
#   snakemake all_tables                                   # tiny config, local CPU (profiles/default)
#   snakemake --profile profiles/slurm all_tables          # paper config, every stage a SLURM job
#   snakemake --configfile workflow/config/small.yaml all_tables
#   snakemake --forcerun finetune all_tables               # rerun one stage and what depends on it
#
# Every rule is one `a2mim` command; stage rules run it through `a2mim launch` (Submitit: local
# subprocess, SLURM job or in-process per `launcher`). The logic (paths, arguments, resources)
# lives in workflow/rules/common.smk, the experiment matrix in workflow/config/<scale>.yaml.

from snakemake.utils import min_version, validate

min_version("9.0")

if "experiment" not in config:  # no --configfile: the toy-scale matrix
    configfile: "workflow/config/tiny.yaml"


validate(config, "workflow/schemas/config.schema.yaml", set_default=True)


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/stages.smk"
include: "workflow/rules/analysis.smk"
include: "workflow/rules/tables.smk"


rule all_tables:
    default_target: True
    input:
        tables=M.table_outputs(),
        audit=f"{RESULTS}/tables/audit.md",
        experiment=f"{RESULTS}/tables/experiment.md",
        figures=M.figure_outputs(),

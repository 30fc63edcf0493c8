# One rule per stage of the registry (a2mim/registry.py) that a workflow config lists
# runs of (pretrain, finetune, linprobe, detect, segment): one job per run, started from its
# init run's output, through `a2mim launch` (local process, SLURM job or in-process).


for _stage in STAGES:

    rule:
        name:
            _stage
        input:
            data=per_run(M.dataset_input, _stage),
            init=per_run(M.init_input, _stage),
        output:
            f"{RESULTS}/runs/{_stage}/{{name}}/{M.output_name(_stage)}",
        log:
            f"{RESULTS}/logs/{_stage}/{{name}}.log",
        wildcard_constraints:
            name=name_pattern(M.runs(_stage)),
        params:
            stage=_stage,  # a value, not the loop variable: shell strings are formatted at run time
            launch=per_run(M.launch_args, _stage),
            args=per_run(M.stage_args, _stage),
            init=per_run(M.init_arg, _stage),
        threads: per_run(M.threads, _stage)
        conda:
            CONDA_ENV
        shell:
            "a2mim launch {params.launch} -- {params.stage} {params.args} {params.init} > {log} 2>&1"

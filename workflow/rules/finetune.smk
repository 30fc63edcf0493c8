# ImageNet-style fine-tuning of a pretrain run's encoder (or from scratch without init).


rule finetune:
    input:
        data=lambda w: M.dataset_input("finetune", w.name),
        init=lambda w: M.init_input("finetune", w.name),
    output:
        metrics=f"{RESULTS}/runs/finetune/{{name}}/metrics.json",
    log:
        f"{RESULTS}/logs/finetune/{{name}}.log",
    wildcard_constraints:
        name=name_pattern(M.runs("finetune")),
    params:
        launch=lambda w: M.launch_args("finetune", w.name),
        args=lambda w: M.stage_args("finetune", w.name),
        init=lambda w: M.init_arg("finetune", w.name),
    threads: lambda w: M.threads("finetune", w.name)
    conda:
        CONDA_ENV
    shell:
        "a2mim launch {params.launch} -- finetune {params.args} {params.init} > {log} 2>&1"

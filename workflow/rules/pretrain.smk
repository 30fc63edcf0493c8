# Masked image modeling pre-training (A²MIM, SimMIM and ablations): one job per run.


rule pretrain:
    input:
        data=lambda w: M.dataset_input("pretrain", w.name),
    output:
        encoder=f"{RESULTS}/runs/pretrain/{{name}}/encoder.pt",
    log:
        f"{RESULTS}/logs/pretrain/{{name}}.log",
    wildcard_constraints:
        name=name_pattern(M.runs("pretrain")),
    params:
        launch=lambda w: M.launch_args("pretrain", w.name),
        args=lambda w: M.stage_args("pretrain", w.name),
    threads: lambda w: M.threads("pretrain", w.name)
    conda:
        CONDA_ENV
    shell:
        "a2mim launch {params.launch} -- pretrain {params.args} > {log} 2>&1"

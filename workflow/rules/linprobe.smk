# Linear probe on the frozen features of a pretrain run's encoder.


rule linprobe:
    input:
        data=lambda w: M.dataset_input("linprobe", w.name),
        init=lambda w: M.init_input("linprobe", w.name),
    output:
        metrics=f"{RESULTS}/runs/linprobe/{{name}}/metrics.json",
    log:
        f"{RESULTS}/logs/linprobe/{{name}}.log",
    wildcard_constraints:
        name=name_pattern(M.runs("linprobe")),
    params:
        launch=lambda w: M.launch_args("linprobe", w.name),
        args=lambda w: M.stage_args("linprobe", w.name),
        init=lambda w: M.init_arg("linprobe", w.name),
    threads: lambda w: M.threads("linprobe", w.name)
    conda:
        CONDA_ENV
    shell:
        "a2mim launch {params.launch} -- linprobe {params.args} {params.init} > {log} 2>&1"

# ADE20K semantic segmentation transfer (UperNet): Tables 3-4.


rule segment:
    input:
        data=lambda w: M.dataset_input("segment", w.name),
        init=lambda w: M.init_input("segment", w.name),
    output:
        metrics=f"{RESULTS}/runs/segment/{{name}}/metrics.json",
    log:
        f"{RESULTS}/logs/segment/{{name}}.log",
    wildcard_constraints:
        name=name_pattern(M.runs("segment")),
    params:
        launch=lambda w: M.launch_args("segment", w.name),
        args=lambda w: M.stage_args("segment", w.name),
        init=lambda w: M.init_arg("segment", w.name),
    threads: lambda w: M.threads("segment", w.name)
    conda:
        CONDA_ENV
    shell:
        "a2mim launch {params.launch} -- segment {params.args} {params.init} > {log} 2>&1"

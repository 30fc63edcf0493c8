# COCO instance segmentation transfer (Mask R-CNN; torchvision or detectron2 backend): Tables 3-4.


rule detect:
    input:
        data=lambda w: M.dataset_input("detect", w.name),
        init=lambda w: M.init_input("detect", w.name),
    output:
        metrics=f"{RESULTS}/runs/detect/{{name}}/metrics.json",
    log:
        f"{RESULTS}/logs/detect/{{name}}.log",
    wildcard_constraints:
        name=name_pattern(M.runs("detect")),
    params:
        launch=lambda w: M.launch_args("detect", w.name),
        args=lambda w: M.stage_args("detect", w.name),
        init=lambda w: M.init_arg("detect", w.name),
    threads: lambda w: M.threads("detect", w.name)
    conda:
        CONDA_ENV
    shell:
        "a2mim launch {params.launch} -- detect {params.args} {params.init} > {log} 2>&1"

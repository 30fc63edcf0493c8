# Datasets the workflow makes itself (toy scale); external ones (`root:`) are read in place.


rule prepare_fashion_mnist:
    output:
        manifest=f"{RESULTS}/data/{{dataset}}/PREPARED.json",
    log:
        f"{RESULTS}/logs/data/{{dataset}}.log",
    wildcard_constraints:
        dataset=name_pattern(M.datasets("prepare")),
    params:
        args=lambda w: M.prepare_args(w.dataset),
        out=lambda w, output: os.path.dirname(output.manifest),
    conda:
        CONDA_ENV
    shell:
        "a2mim prepare fashion-mnist --out {params.out} {params.args} > {log} 2>&1"


rule prepare_scenes:
    output:
        manifest=f"{RESULTS}/data/{{dataset}}/manifest.json",
    log:
        f"{RESULTS}/logs/data/{{dataset}}.log",
    wildcard_constraints:
        dataset=name_pattern(M.datasets("scenes")),
    params:
        args=lambda w: M.prepare_args(w.dataset),
        out=lambda w, output: os.path.dirname(output.manifest),
    conda:
        CONDA_ENV
    shell:
        "a2mim prepare scenes --out {params.out} {params.args} > {log} 2>&1"

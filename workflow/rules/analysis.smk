# The paper's Section 3 evidence: Fig. 1 (occlusion robustness, interactions J(m)), Fig. 3
# (Fourier / variance of features), Fig. 5 (reconstructions), from finished runs.


rule analyze:
    input:
        lambda w: M.figure_inputs(w.figure),
    output:
        png=report(f"{RESULTS}/figures/{{figure}}/{{figure}}.png", category="Figures"),
        svg=f"{RESULTS}/figures/{{figure}}/{{figure}}.svg",
        csv=f"{RESULTS}/figures/{{figure}}/{{figure}}.csv",
        metrics=f"{RESULTS}/figures/{{figure}}/metrics.json",
    log:
        f"{RESULTS}/logs/analysis/{{figure}}.log",
    wildcard_constraints:
        figure=name_pattern(M.figures()),
    params:
        launch=lambda w: M.launch_args("analyze", w.figure),
        args=lambda w: M.figure_args(w.figure),
    threads: lambda w: M.threads("analyze", w.figure)
    conda:
        CONDA_ENV
    shell:
        "a2mim launch {params.launch} -- analyze {wildcards.figure} {params.args} > {log} 2>&1"


for _figure in FIGURES:

    rule:
        name:
            _figure
        input:
            M.figure_outputs([_figure]) if _figure in M.figures() else [],

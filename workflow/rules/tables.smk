# Paper tables, the audit and the experiment table (every run), from MLflow alone (`a2mim
# tables` queries the tracking store and the runs' per-sample prediction artifacts).


rule table:
    input:
        lambda w: M.table_inputs(w.table),
    output:
        md=report(f"{RESULTS}/tables/{{table}}.md", category="Tables"),
        csv=report(f"{RESULTS}/tables/{{table}}.csv", category="Tables"),
        tex=f"{RESULTS}/tables/{{table}}.tex",
    log:
        f"{RESULTS}/logs/tables/{{table}}.log",
    wildcard_constraints:
        table="|".join(TABLES),
    params:
        experiment=EXPERIMENT,
        uri=M.tracking_uri,
        out=lambda w, output: os.path.dirname(output.md),
    conda:
        CONDA_ENV
    shell:
        "a2mim tables --experiment {params.experiment} --tracking-uri {params.uri:q} "
        "--out {params.out} --table {wildcards.table} > {log} 2>&1"


rule audit:
    input:
        [M.table_inputs(t) for t in TABLES],
        M.run_outputs(),
    output:
        md=report(f"{RESULTS}/tables/audit.md", category="Audit"),
        json=f"{RESULTS}/tables/audit.json",
        experiment=report(f"{RESULTS}/tables/experiment.md", category="Experiment"),
        experiment_csv=report(f"{RESULTS}/tables/experiment.csv", category="Experiment"),
    log:
        f"{RESULTS}/logs/tables/audit.log",
    params:
        experiment=EXPERIMENT,
        uri=M.tracking_uri,
        out=lambda w, output: os.path.dirname(output.md),
    conda:
        CONDA_ENV
    shell:
        "a2mim tables --experiment {params.experiment} --tracking-uri {params.uri:q} "
        "--out {params.out} --audit-only > {log} 2>&1"


for _table in TABLES:

    rule:
        name:
            _table
        input:
            M.table_outputs([_table]),

//! `cargo xtask reproduce`: the paper's Table 1 (image/pixel AUROC per class, baseline vs
//! "+ method") and Table 2 (inference ms/image) from one command, plus AUPRO / F1-max and
//! Fig.-1/Fig.-5-style heatmap galleries.
//!
//! Every (category, scorer, method) is one *cell* with its own folder; a cell is finished when
//! its `report.json` exists (written atomically by `tessera test`), so an interrupted run
//! resumes where it stopped and a failed cell is recorded (`error.txt`) without stopping the
//! others. The tables are rebuilt from the cell reports at the end of every run.

use crate::reports::{self, DataInfo, TestReport};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const USAGE: &str = "  reproduce --data ROOT [--categories a,b] [--scorers padim,patchcore,cfa]
            [--backbone resnet18|wide_resnet50_2] [--weights FILE | --random-weights N]
            [--textures DIR] [--preprocess P] [--run NAME] [--out DIR] [--cfa-epochs N]
            [--sbm-epochs N] [--padim-dims N] [--gallery N] [--shard I/N] [--tessera BIN]
  reproduce --merge DIR,DIR,... --out DIR [--tessera BIN]
        --shard I/N runs only shard I (0-based) of N: categories are dealt round-robin (cells,
        when there are fewer categories than shards), so N machines (a Kubernetes Indexed Job,
        a Slurm array) share a run; --merge gathers the shards' cells and writes the tables.
        --tessera uses that binary instead of building one. --padim-dims 100 fits the paper's
        PaDiM (100 dimensions, a covariance per position) instead of the default (every
        channel, covariances shared by 4 × 4 blocks).
        For every category under ROOT (MVTec layout; ROOT may be one category) and every scorer,
        fit + test the baseline and '+ method' (--method ours: PFAM, plus SBM on object
        categories, per the paper), then write DIR/table1.{md,csv,json} (image/pixel AUROC, AUPRO,
        F1-max), DIR/table2.md (ms/image) and DIR/gallery/<class>-<scorer>.png. DIR defaults
        to results/<run> (run: the date). Resumable: finished cells are kept and skipped.";

const METHODS: [&str; 2] = ["baseline", "method"];

/// What defines a run's tables (written to `run.json`, compared when resuming and merging).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct RunRecord {
    data: PathBuf,
    categories: Vec<(String, PathBuf)>,
    kinds: BTreeMap<String, String>,
    scorers: Vec<String>,
    backbone: String,
    weights: Option<String>,
    random_weights: Option<String>,
    preprocess: Option<String>,
    textures: Option<String>,
    cfa_epochs: Option<String>,
    sbm_epochs: Option<String>,
    /// PaDiM's `--padim-dims` (runs from before it existed: the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    padim_dims: Option<String>,
    gallery: usize,
}

struct Opts {
    data: PathBuf,
    categories: Vec<(String, PathBuf)>,
    /// Category kind (`object`, `texture`, `other`), as the binary decides it.
    kinds: BTreeMap<String, &'static str>,
    scorers: Vec<String>,
    backbone: String,
    weights: Option<String>,
    textures: Option<String>,
    out: PathBuf,
    cfa_epochs: Option<String>,
    sbm_epochs: Option<String>,
    padim_dims: Option<String>,
    gallery: usize,
    random_weights: Option<String>,
    preprocess: Option<String>,
    /// (index, count) of this shard.
    shard: Option<(usize, usize)>,
    /// A binary to use instead of building one.
    tessera: Option<PathBuf>,
}

fn is_category(p: &Path) -> bool {
    p.join("train/good").is_dir() && p.join("test").is_dir()
}

fn parse(args: &[String]) -> Result<Opts> {
    let data = PathBuf::from(crate::flag(args, "--data").context("--data ROOT is required")?);
    if !data.is_dir() {
        bail!("{}: not a folder", data.display());
    }
    let mut categories: Vec<(String, PathBuf)> = if is_category(&data) {
        let name = data
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "category".into());
        vec![(name, data.clone())]
    } else {
        let mut v: Vec<(String, PathBuf)> = std::fs::read_dir(&data)
            .with_context(|| format!("reading {}", data.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| is_category(p))
            .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), p))
            .collect();
        v.sort();
        v
    };
    if let Some(want) = crate::flag(args, "--categories") {
        let want: Vec<&str> = want.split(',').map(str::trim).collect();
        for w in &want {
            if !categories.iter().any(|(n, _)| n == w) {
                bail!("category '{w}' not found under {}", data.display());
            }
        }
        categories.retain(|(n, _)| want.contains(&n.as_str()));
    }
    if categories.is_empty() {
        bail!(
            "no category (a folder with train/good and test/) under {}",
            data.display()
        );
    }
    let scorers: Vec<String> = crate::flag(args, "--scorers")
        .unwrap_or_else(|| "padim,patchcore,cfa".into())
        .split(',')
        .map(|s| s.trim().to_string())
        .collect();
    for s in &scorers {
        if !["padim", "patchcore", "cfa"].contains(&s.as_str()) {
            bail!("unknown scorer '{s}' (padim, patchcore, cfa)");
        }
    }
    let run = crate::flag(args, "--run").unwrap_or_else(today);
    let out = crate::flag(args, "--out")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::root().join("results").join(&run));
    Ok(Opts {
        data,
        categories,
        kinds: BTreeMap::new(),
        scorers,
        backbone: crate::flag(args, "--backbone").unwrap_or_else(|| "resnet18".into()),
        weights: crate::flag(args, "--weights"),
        textures: crate::flag(args, "--textures"),
        out,
        cfa_epochs: crate::flag(args, "--cfa-epochs"),
        sbm_epochs: crate::flag(args, "--sbm-epochs"),
        padim_dims: crate::flag(args, "--padim-dims"),
        gallery: crate::flag(args, "--gallery")
            .map(|g| g.parse())
            .transpose()
            .context("--gallery N")?
            .unwrap_or(4),
        random_weights: crate::flag(args, "--random-weights"),
        preprocess: crate::flag(args, "--preprocess"),
        shard: crate::flag(args, "--shard")
            .map(|s| parse_shard(&s))
            .transpose()?,
        tessera: crate::flag(args, "--tessera").map(PathBuf::from),
    })
}

/// `I/N` with `I < N`.
fn parse_shard(s: &str) -> Result<(usize, usize)> {
    let (i, n) = s
        .split_once('/')
        .with_context(|| format!("--shard {s}: expected I/N, e.g. 0/4"))?;
    let (i, n): (usize, usize) = (
        i.trim().parse().with_context(|| format!("--shard {s}"))?,
        n.trim().parse().with_context(|| format!("--shard {s}"))?,
    );
    if n == 0 || i >= n {
        bail!("--shard {s}: need 0 <= I < N");
    }
    Ok((i, n))
}

/// A cell of the run: (category, its folder, scorer, method).
type Cell = (String, PathBuf, String, &'static str);

impl Opts {
    fn record(&self) -> RunRecord {
        RunRecord {
            data: self.data.clone(),
            categories: self.categories.clone(),
            kinds: self
                .kinds
                .iter()
                .map(|(k, v)| (k.clone(), v.to_string()))
                .collect(),
            scorers: self.scorers.clone(),
            backbone: self.backbone.clone(),
            weights: self.weights.clone(),
            random_weights: self.random_weights.clone(),
            preprocess: self.preprocess.clone(),
            textures: self.textures.clone(),
            cfa_epochs: self.cfa_epochs.clone(),
            sbm_epochs: self.sbm_epochs.clone(),
            padim_dims: self.padim_dims.clone(),
            gallery: self.gallery,
        }
    }

    fn from_record(r: RunRecord, out: PathBuf, tessera: Option<PathBuf>) -> Self {
        let kind = |k: &str| match k {
            "texture" => "texture",
            "object" => "object",
            _ => "other",
        };
        Opts {
            data: r.data,
            categories: r.categories,
            kinds: r.kinds.iter().map(|(c, k)| (c.clone(), kind(k))).collect(),
            scorers: r.scorers,
            backbone: r.backbone,
            weights: r.weights,
            textures: r.textures,
            out,
            cfa_epochs: r.cfa_epochs,
            sbm_epochs: r.sbm_epochs,
            padim_dims: r.padim_dims,
            gallery: r.gallery,
            random_weights: r.random_weights,
            preprocess: r.preprocess,
            shard: None,
            tessera,
        }
    }

    /// Every cell of the run, in table order.
    fn cells(&self) -> Vec<Cell> {
        let mut v = Vec::new();
        for (cat, dir) in &self.categories {
            for scorer in &self.scorers {
                for method in METHODS {
                    v.push((cat.clone(), dir.clone(), scorer.clone(), method));
                }
            }
        }
        v
    }

    /// The cells this shard runs: categories dealt round-robin (a category's cells share its
    /// SBM weights), or cells when there are fewer categories than shards.
    fn my_cells(&self) -> Vec<Cell> {
        let all = self.cells();
        let Some((i, n)) = self.shard else {
            return all;
        };
        if self.categories.len() >= n {
            let mine: Vec<&String> = self
                .categories
                .iter()
                .enumerate()
                .filter(|(k, _)| k % n == i)
                .map(|(_, (c, _))| c)
                .collect();
            all.into_iter().filter(|c| mine.contains(&&c.0)).collect()
        } else {
            all.into_iter()
                .enumerate()
                .filter(|(k, _)| k % n == i)
                .map(|(_, c)| c)
                .collect()
        }
    }

    /// `--weights` / `--random-weights` and `--preprocess` for `fit` and `sbm train`.
    fn source_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        if let Some(w) = &self.weights {
            a.extend(["--weights".to_string(), w.clone()]);
        }
        if let Some(r) = &self.random_weights {
            a.extend(["--random-weights".to_string(), r.clone()]);
        }
        if let Some(p) = &self.preprocess {
            a.extend(["--preprocess".to_string(), p.clone()]);
        }
        a
    }

    fn binary(&self) -> Result<PathBuf> {
        match &self.tessera {
            Some(b) if b.is_file() => Ok(b.clone()),
            Some(b) => bail!("--tessera {}: no such file", b.display()),
            None => crate::build_tessera(),
        }
    }
}

/// Write or check `run.json`: a folder holds one run's cells, never a mix.
fn record_run(o: &Opts) -> Result<()> {
    let p = o.out.join("run.json");
    let mine = o.record();
    if p.is_file() {
        let theirs: RunRecord = reports::read(&p)?;
        if theirs != mine {
            bail!(
                "{} holds a run with other settings ({}); resume it with the same options or \
                 choose another --out",
                o.out.display(),
                p.display()
            );
        }
        return Ok(());
    }
    std::fs::write(&p, serde_json::to_string_pretty(&mine)?)
        .with_context(|| format!("writing {}", p.display()))
}

fn today() -> String {
    let out = Command::new("date").arg("+%Y-%m-%d").output();
    out.ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "run".into())
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

impl Opts {
    /// Object or texture, as `tessera data info` says (the folder spec, else MVTec AD's split,
    /// else judged from the images); `other` when unknown.
    fn kind(&self, cat: &str) -> &'static str {
        self.kinds.get(cat).copied().unwrap_or("other")
    }

    /// The folder of one cell: `OUT/cells/<category>/<scorer>-<method>`.
    fn cell(&self, cat: &str, scorer: &str, method: &str) -> PathBuf {
        self.out
            .join("cells")
            .join(cat)
            .join(format!("{scorer}-{method}"))
    }
}

/// Ask the binary what kind each category is.
fn category_kinds(bin: &Path, o: &mut Opts) -> Result<()> {
    for (cat, dir) in &o.categories {
        let out = Command::new(bin)
            .args(["--json", "data", "info"])
            .arg(dir)
            .output()
            .with_context(|| format!("running tessera data info on {}", dir.display()))?;
        if !out.status.success() {
            bail!(
                "tessera data info {}: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let info: DataInfo = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("parsing tessera data info for {cat}"))?;
        let kind = match info.kind.as_deref() {
            Some("texture") => "texture",
            Some("object") => "object",
            _ => "other",
        };
        o.kinds.insert(cat.clone(), kind);
    }
    Ok(())
}

fn run_logged(cmd: &mut Command, log: &Path) -> Result<()> {
    run_logged_to(cmd, log, None)
}

/// [`run_logged`], with standard output written to `stdout` instead of the log when given.
fn run_logged_to(cmd: &mut Command, log: &Path, stdout: Option<&Path>) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let mut text = match stdout {
        Some(p) => {
            std::fs::write(p, &out.stdout).with_context(|| format!("writing {}", p.display()))?;
            String::new()
        }
        None => String::from_utf8_lossy(&out.stdout).into_owned(),
    };
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    std::fs::write(log, &text).ok();
    if !out.status.success() {
        let tail: Vec<&str> = text.lines().rev().take(5).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!("{}", tail.join("\n"));
    }
    Ok(())
}

/// The "+ method" weights of a category — SBM-tuned backbone (object classes; frozen for the
/// others, as the paper) plus PFAM trained on the jigsaw task — trained once, shared by every
/// scorer.
fn sbm_weights(bin: &Path, o: &Opts, cat: &str, dir: &Path) -> Result<PathBuf> {
    let out = o.out.join("sbm").join(format!("{cat}.safetensors"));
    if out.is_file() {
        return Ok(out);
    }
    std::fs::create_dir_all(out.parent().unwrap())?;
    let mut c = Command::new(bin);
    c.args(["--quiet", "sbm", "train", "--pfam", "--data"])
        .arg(dir)
        .arg("--out")
        .arg(&out)
        .args(["--backbone", &o.backbone]);
    if o.kind(cat) != "object" {
        c.args(["--sbm-layers", "none"]);
    }
    c.args(o.source_args());
    if let Some(t) = &o.textures {
        c.args(["--textures", t]);
    }
    if let Some(e) = &o.sbm_epochs {
        c.args(["--sbm-epochs", e]);
    }
    println!("reproduce: {cat}: training SBM + PFAM (once for all scorers)");
    run_logged(&mut c, &o.out.join("sbm").join(format!("{cat}.log")))
        .with_context(|| format!("SBM on {cat}"))?;
    Ok(out)
}

fn run_cell(bin: &Path, o: &Opts, cat: &str, dir: &Path, scorer: &str, method: &str) -> Result<()> {
    let cell = o.cell(cat, scorer, method);
    std::fs::create_dir_all(&cell)?;
    let model = cell.join("model.safetensors");
    let mut fit = Command::new(bin);
    // The method cell's fit prints its summary (with the method gate's evidence) as JSON.
    let quiet = if method == "method" {
        "--json"
    } else {
        "--quiet"
    };
    fit.args([quiet, "fit", "--data", &s(dir), "--scorer", scorer])
        .args(["--backbone", &o.backbone, "--out", &s(&model)]);
    fit.args(o.source_args());
    if let (Some(e), "cfa") = (&o.cfa_epochs, scorer) {
        fit.args(["--epochs", e]);
    }
    if let (Some(d), "padim") = (&o.padim_dims, scorer) {
        fit.args(["--padim-dims", d]);
    }
    if method == "method" {
        let w = sbm_weights(bin, o, cat, dir)?;
        // The table reports the method's own numbers; the gate's choice is recorded beside
        // them (`fit.json`) and shown as its own column.
        fit.args(["--method", "ours", "--sbm-weights", &s(&w)])
            .args(["--method-gate", "report"]);
    }
    let summary = (method == "method").then(|| cell.join("fit.json"));
    run_logged_to(&mut fit, &cell.join("fit.log"), summary.as_deref()).context("fit")?;
    let mut test = Command::new(bin);
    test.args(["--quiet", "test", "--model", &s(&model), "--data", &s(dir)])
        .args(["--report", &s(&cell.join("report.json"))])
        .args(["--heatmaps", &s(&cell.join("heatmaps"))]);
    run_logged(&mut test, &cell.join("test.log")).context("test")?;
    // Models are large (PaDiM keeps inverse covariances); the report and heatmaps stay.
    std::fs::remove_file(&model).ok();
    Ok(())
}

pub fn reproduce(args: &[String]) -> Result<()> {
    if let Some(dirs) = crate::flag(args, "--merge") {
        return merge(&dirs, args);
    }
    let mut o = parse(args)?;
    std::fs::create_dir_all(&o.out)?;
    let bin = o.binary()?;
    category_kinds(&bin, &mut o)?;
    record_run(&o)?;
    let cells = o.my_cells();
    println!(
        "reproduce: {} categories × {} scorers × 2 methods{} → {}",
        o.categories.len(),
        o.scorers.len(),
        match o.shard {
            Some((i, n)) => format!(", shard {i}/{n}: {} cells", cells.len()),
            None => String::new(),
        },
        o.out.display()
    );
    let mut failed = Vec::new();
    for (cat, dir, scorer, method) in &cells {
        let cell = o.cell(cat, scorer, method);
        if cell.join("report.json").is_file() {
            println!("reproduce: {cat} {scorer} {method}: done earlier, kept");
            continue;
        }
        println!("reproduce: {cat} {scorer} {method}: running");
        if let Err(e) = run_cell(&bin, &o, cat, dir, scorer, method) {
            let msg = format!("{e:#}");
            eprintln!("reproduce: {cat} {scorer} {method}: FAILED: {msg}");
            std::fs::create_dir_all(&cell).ok();
            std::fs::write(cell.join("error.txt"), &msg).ok();
            failed.push(format!("{cat}/{scorer}/{method}"));
        } else {
            std::fs::remove_file(cell.join("error.txt")).ok();
        }
    }
    finish(&o, &bin)?;
    if !failed.is_empty() {
        bail!("{} cell(s) failed: {}", failed.len(), failed.join(", "));
    }
    Ok(())
}

/// The tables and galleries of what `o.out` holds.
fn finish(o: &Opts, bin: &Path) -> Result<()> {
    let tables = write_tables(o)?;
    for (cat, _) in &o.categories {
        for scorer in &o.scorers {
            if let Err(e) = gallery(bin, o, cat, scorer) {
                eprintln!("reproduce: gallery {cat}/{scorer}: {e:#}");
            }
        }
    }
    println!("{tables}");
    println!(
        "reproduce: tables in {}/table1.md, table2.md (+ .csv, .json); galleries in {}/gallery",
        o.out.display(),
        o.out.display()
    );
    Ok(())
}

/// Copy a folder tree (files and folders only).
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let e = e?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        if e.file_type()?.is_dir() {
            copy_tree(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst)
                .with_context(|| format!("copying {} → {}", src.display(), dst.display()))?;
        }
    }
    Ok(())
}

/// `--merge A,B,… --out C`: the shards' cells into C, then C's tables and galleries.
fn merge(dirs: &str, args: &[String]) -> Result<()> {
    let out = PathBuf::from(crate::flag(args, "--out").context("--merge needs --out DIR")?);
    let shards: Vec<PathBuf> = dirs.split(',').map(|d| PathBuf::from(d.trim())).collect();
    let mut record: Option<RunRecord> = None;
    for d in &shards {
        let r: RunRecord = reports::read(&d.join("run.json"))
            .with_context(|| format!("{} is not a reproduce run", d.display()))?;
        match &record {
            None => record = Some(r),
            Some(first) if *first != r => bail!(
                "{} was run with other settings than {}: shards of one run only",
                d.display(),
                shards[0].display()
            ),
            Some(_) => {}
        }
    }
    let record = record.context("--merge names no folder")?;
    std::fs::create_dir_all(&out)?;
    let o = Opts::from_record(
        record,
        out.clone(),
        crate::flag(args, "--tessera").map(PathBuf::from),
    );
    record_run(&o)?;
    let mut merged = 0;
    for (cat, _, scorer, method) in o.cells() {
        let rel = Path::new("cells")
            .join(&cat)
            .join(format!("{scorer}-{method}"));
        // The shard that finished the cell (a report), else one that tried (an error).
        let src = shards
            .iter()
            .map(|d| d.join(&rel))
            .find(|c| c.join("report.json").is_file())
            .or_else(|| shards.iter().map(|d| d.join(&rel)).find(|c| c.is_dir()));
        if let Some(src) = src {
            let dst = out.join(&rel);
            if dst != src {
                if dst.exists() {
                    std::fs::remove_dir_all(&dst)?;
                }
                copy_tree(&src, &dst)?;
            }
            merged += 1;
        }
    }
    println!(
        "reproduce: merged {merged} of {} cells from {} shard(s) into {}",
        o.cells().len(),
        shards.len(),
        out.display()
    );
    let bin = o.binary()?;
    finish(&o, &bin)
}

fn load_report(o: &Opts, cat: &str, scorer: &str, method: &str) -> Option<TestReport> {
    let p = o.cell(cat, scorer, method).join("report.json");
    if !p.is_file() {
        return None;
    }
    match reports::read(&p) {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("reproduce: {e:#}; the cell counts as missing");
            None
        }
    }
}

/// The method gate's record from a method cell's `fit.json` (absent for older runs or when the
/// fit failed).
fn load_gate(o: &Opts, cat: &str, scorer: &str) -> Option<Value> {
    let p = o.cell(cat, scorer, "method").join("fit.json");
    let v: Value = serde_json::from_slice(&std::fs::read(p).ok()?).ok()?;
    v.get("gate").filter(|g| g.is_object()).cloned()
}

fn pct(v: Option<f64>) -> String {
    v.map(|v| format!("{:.1}", v * 100.0))
        .unwrap_or_else(|| "–".into())
}

/// "a / b" with the better of each pair in bold (ties: both).
fn pair(base: Option<f64>, ours: Option<f64>) -> (String, String) {
    let (b, m) = (pct(base), pct(ours));
    match (base, ours) {
        (Some(x), Some(y)) => {
            // Compare at the printed precision so that equal-looking numbers are both bold.
            let (x, y) = ((x * 1000.0).round(), (y * 1000.0).round());
            let bold = |s: String, yes: bool| if yes { format!("**{s}**") } else { s };
            (bold(b, x >= y), bold(m, y >= x))
        }
        _ => (b, m),
    }
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn write_tables(o: &Opts) -> Result<String> {
    let metrics = [
        ("image_auroc", "I-AUROC"),
        ("pixel_auroc", "P-AUROC"),
        ("pixel_aupro", "AUPRO"),
        ("image_f1_max", "I-F1max"),
        ("pixel_f1_max", "P-F1max"),
        ("false_alarm_rate", "FAR@thr"),
        ("recall", "recall@thr"),
        ("precision", "precision@thr"),
        ("f1_at_threshold", "F1@thr"),
    ];
    // values[(scorer, method, metric)][category]
    let mut rows: Vec<Value> = Vec::new();
    let mut by: BTreeMap<(String, String, String), Vec<(String, f64)>> = BTreeMap::new();
    for (cat, _) in &o.categories {
        for scorer in &o.scorers {
            for method in METHODS {
                let r = load_report(o, cat, scorer, method);
                let mut row = json!({
                    "category": cat, "kind": o.kind(cat), "scorer": scorer, "method": method,
                    "status": if r.is_some() { "done" } else { "missing" },
                });
                if let Some(r) = &r {
                    for (k, _) in metrics {
                        row[k] = json!(r.metric(k));
                        if let Some(v) = r.metric(k) {
                            by.entry((scorer.clone(), method.into(), k.into()))
                                .or_default()
                                .push((cat.clone(), v));
                        }
                    }
                    row["ms_per_image"] = json!(r.ms_per_image);
                    row["method_detail"] = json!(r.method);
                }
                if method == "method" {
                    if let Some(g) = load_gate(o, cat, scorer) {
                        row["gate"] = g;
                    }
                }
                rows.push(row);
            }
        }
    }
    let get = |scorer: &str, method: &str, k: &str, cat: &str| -> Option<f64> {
        by.get(&(scorer.into(), method.into(), k.into()))?
            .iter()
            .find(|(c, _)| c == cat)
            .map(|(_, v)| *v)
    };
    let avg = |scorer: &str, method: &str, k: &str, which: &str| -> Option<f64> {
        let v: Vec<f64> = by
            .get(&(scorer.into(), method.into(), k.into()))?
            .iter()
            .filter(|(c, _)| which == "all" || o.kind(c) == which)
            .map(|(_, v)| *v)
            .collect();
        mean(&v)
    };

    // Table 1: (I-AUROC, P-AUROC) per class, baseline vs + method, best of each pair bold.
    let mut md = String::new();
    writeln!(
        md,
        "# Table 1 — image / pixel AUROC (%), baseline vs + method\n\n\
         Data: `{}`; backbone {}{}. \"+ method\" = `--method ours`: PFAM trained on the \
         jigsaw task, with SBM fine-tuning the backbone on object classes only (the paper's \
         `--sbm auto`). Each cell is (I-AUROC, P-AUROC); the better of each pair is bold.\n",
        o.data.display(),
        o.backbone,
        o.weights
            .as_deref()
            .map(|w| format!(" (weights `{w}`)"))
            .unwrap_or_default()
    )?;
    let mut head = "| class | kind |".to_string();
    let mut sep = "|---|---|".to_string();
    for sc in &o.scorers {
        write!(head, " {sc} | {sc} + method |")?;
        sep.push_str("---|---|");
    }
    writeln!(md, "{head}\n{sep}")?;
    let line = |label: &str, k: &str, f: &dyn Fn(&str, &str, &str) -> Option<f64>| {
        let mut l = format!("| {label} | {k} |");
        for sc in &o.scorers {
            let (bi, mi) = pair(
                f(sc, "baseline", "image_auroc"),
                f(sc, "method", "image_auroc"),
            );
            let (bp, mp) = pair(
                f(sc, "baseline", "pixel_auroc"),
                f(sc, "method", "pixel_auroc"),
            );
            let _ = write!(l, " ({bi}, {bp}) | ({mi}, {mp}) |");
        }
        l
    };
    for which in ["texture", "object", "other"] {
        let cats: Vec<&String> = o
            .categories
            .iter()
            .map(|(c, _)| c)
            .filter(|c| o.kind(c) == which)
            .collect();
        for c in &cats {
            writeln!(md, "{}", line(c, which, &|s, m, k| get(s, m, k, c)))?;
        }
        if !cats.is_empty() && which != "other" {
            writeln!(
                md,
                "{}",
                line(&format!("**{which} mean**"), which, &|s, m, k| avg(
                    s, m, k, which
                ))
            )?;
        }
    }
    writeln!(
        md,
        "{}",
        line("**mean**", "all", &|s, m, k| avg(s, m, k, "all"))
    )?;
    writeln!(
        md,
        "\n## AUPRO (FPR ≤ 0.3), F1-max, and the model's own decisions (%)\n\n\
         F1-max is chosen on the test labels (an oracle); the last four columns are at the \
         threshold the model stores from its calibration (held-out normal images, conformal, \
         `--target-fpr`): false-alarm rate on the good test images, recall, precision and F1.\n\n\
         | class | scorer | method | AUPRO | I-F1max | P-F1max | FAR@thr | recall@thr | precision@thr | F1@thr |\n\
         |---|---|---|---|---|---|---|---|---|---|"
    )?;
    for (cat, _) in &o.categories {
        for sc in &o.scorers {
            for m in METHODS {
                writeln!(
                    md,
                    "| {cat} | {sc} | {m} | {} | {} | {} | {} | {} | {} | {} |",
                    pct(get(sc, m, "pixel_aupro", cat)),
                    pct(get(sc, m, "image_f1_max", cat)),
                    pct(get(sc, m, "pixel_f1_max", cat)),
                    pct(get(sc, m, "false_alarm_rate", cat)),
                    pct(get(sc, m, "recall", cat)),
                    pct(get(sc, m, "precision", cat)),
                    pct(get(sc, m, "f1_at_threshold", cat))
                )?;
            }
        }
    }
    writeln!(
        md,
        "\n## The method gate: what `fit --method ours` keeps\n\n\
         At fit time the baseline is fitted too, and both score the held-out calibration normals \
         plus synthetic defects pasted onto them (no test image, no label); the method is kept \
         only when its mean of image and pixel AUROC there is higher. The method cells above are \
         fitted with `--method-gate report` (the method's own numbers, the gate's choice \
         recorded); \"kept\" shows the test AUROC of the model the default `fit` would write.\n\n\
         | class | scorer | gate: baseline (I, P) | gate: + method (I, P) | choice | kept on test (I, P) |\n\
         |---|---|---|---|---|---|"
    )?;
    for (cat, _) in &o.categories {
        for sc in &o.scorers {
            let Some(g) = load_gate(o, cat, sc) else {
                writeln!(md, "| {cat} | {sc} | – | – | – | – |")?;
                continue;
            };
            let gp = |side: &str, k: &str| pct(g[side][k].as_f64());
            let choice = g["choice"].as_str().unwrap_or("?");
            let kept = if choice == "baseline" {
                "baseline"
            } else {
                "method"
            };
            writeln!(
                md,
                "| {cat} | {sc} | ({}, {}) | ({}, {}) | {choice} | ({}, {}) |",
                gp("baseline", "image_auroc"),
                gp("baseline", "pixel_auroc"),
                gp("method", "image_auroc"),
                gp("method", "pixel_auroc"),
                pct(get(sc, kept, "image_auroc", cat)),
                pct(get(sc, kept, "pixel_auroc", cat)),
            )?;
        }
    }
    let missing: Vec<String> = rows
        .iter()
        .filter(|r| r["status"] == "missing")
        .map(|r| format!("{}/{}/{}", r["category"], r["scorer"], r["method"]).replace('"', ""))
        .collect();
    if !missing.is_empty() {
        writeln!(
            md,
            "\nMissing (failed or not run yet): {}",
            missing.join(", ")
        )?;
    }
    std::fs::write(o.out.join("table1.md"), &md)?;

    // CSV and JSON: one row per cell.
    let mut csv = String::from("category,kind,scorer,method,status");
    for (k, _) in metrics {
        write!(csv, ",{k}")?;
    }
    csv.push_str(",ms_per_image\n");
    for r in &rows {
        write!(
            csv,
            "{},{},{},{},{}",
            r["category"].as_str().unwrap_or(""),
            r["kind"].as_str().unwrap_or(""),
            r["scorer"].as_str().unwrap_or(""),
            r["method"].as_str().unwrap_or(""),
            r["status"].as_str().unwrap_or("")
        )?;
        for (k, _) in metrics {
            write!(
                csv,
                ",{}",
                r[k].as_f64().map(|v| format!("{v:.6}")).unwrap_or_default()
            )?;
        }
        writeln!(
            csv,
            ",{}",
            r["ms_per_image"]
                .as_f64()
                .map(|v| format!("{v:.2}"))
                .unwrap_or_default()
        )?;
    }
    std::fs::write(o.out.join("table1.csv"), csv)?;
    std::fs::write(
        o.out.join("table1.json"),
        serde_json::to_string_pretty(&json!({
            "data": s(&o.data), "backbone": o.backbone, "weights": o.weights, "cells": rows,
        }))?,
    )?;

    // Table 2: inference ms/image, measured in this run.
    let mut t2 = format!(
        "# Table 2 — inference time (ms/image, end to end: decode, features, scoring, \
         upsampling, blur), baseline vs + method\n\nMeasured by `tessera test` in this run on \
         this machine ({} threads).\n\n| scorer | baseline | + method | overhead |\n|---|---|---|---|\n",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    for sc in &o.scorers {
        let ms = |m: &str| {
            let v: Vec<f64> = rows
                .iter()
                .filter(|r| r["scorer"] == sc.as_str() && r["method"] == m)
                .filter_map(|r| r["ms_per_image"].as_f64())
                .collect();
            mean(&v)
        };
        let f = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "–".into());
        let over = match (ms("baseline"), ms("method")) {
            (Some(b), Some(m)) => format!("{:+.1}", m - b),
            _ => "–".into(),
        };
        writeln!(
            t2,
            "| {sc} | {} | {} | {over} |",
            f(ms("baseline")),
            f(ms("method"))
        )?;
    }
    t2.push_str(
        "\nSBM changes only the backbone's weights and adds no inference cost; the overhead is \
         PFAM's (MFCSAM on X1 and X3) on this CPU.\n",
    );
    std::fs::write(o.out.join("table2.md"), &t2)?;
    Ok(format!("{md}\n{t2}"))
}

/// Fig. 5 style: per row image | GT | baseline heatmap | baseline mask | + method heatmap |
/// + method mask, for the first `o.gallery` defect images of the class (`tessera gallery`).
fn gallery(bin: &Path, o: &Opts, cat: &str, scorer: &str) -> Result<()> {
    let base = o.cell(cat, scorer, "baseline").join("heatmaps");
    let ours = o.cell(cat, scorer, "method").join("heatmaps");
    if !base.is_dir() || !ours.is_dir() {
        return Ok(());
    }
    let dir = o.out.join("gallery");
    std::fs::create_dir_all(&dir)?;
    let mut c = Command::new(bin);
    c.args(["--quiet", "gallery", "--heatmaps"])
        .arg(&base)
        .arg("--heatmaps")
        .arg(&ours)
        .args(["--rows", &o.gallery.to_string(), "--out"])
        .arg(dir.join(format!("{cat}-{scorer}.png")));
    run_logged(&mut c, &dir.join(format!("{cat}-{scorer}.log")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--padim-dims` reaches the run record; a run from before it existed (no key) resumes
    /// as a run with the default, and a record without it is written as before.
    #[test]
    fn padim_dims_is_part_of_the_run() {
        let tmp = tempfile::tempdir().unwrap();
        let cat = tmp.path().join("bottle");
        std::fs::create_dir_all(cat.join("train/good")).unwrap();
        std::fs::create_dir_all(cat.join("test/good")).unwrap();
        let args = |extra: &[&str]| -> Vec<String> {
            ["--data", &cat.display().to_string(), "--scorers", "padim"]
                .iter()
                .chain(extra)
                .map(|s| s.to_string())
                .collect()
        };
        let paper = parse(&args(&["--padim-dims", "100"])).unwrap().record();
        assert_eq!(paper.padim_dims.as_deref(), Some("100"));
        let default = parse(&args(&[])).unwrap().record();
        let json = serde_json::to_value(&default).unwrap();
        assert!(json.get("padim_dims").is_none(), "{json}");
        let back: RunRecord = serde_json::from_value(json).unwrap();
        assert_eq!(back, default);
        assert_ne!(back, paper);
    }
}

//! The documentation says what the code does: the README's `serve` synopsis and flag table name
//! exactly the flags `loopvol serve` takes, with its defaults; the README's list of default
//! capabilities is the one the driver advertises; docs/operations.md's account of CLI errors
//! holds; and no message in the sources has a sentence broken by a run of spaces (a string
//! continuation that lost its `\`). No root needed: it reads files and runs `--help`-like
//! commands only.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::CommandFactory;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn readme() -> String {
    std::fs::read_to_string(repo().join("README.md")).unwrap()
}

/// The text of README section `heading` (a `## ` line), up to the next `## `.
fn section<'a>(text: &'a str, heading: &str) -> &'a str {
    let start = text
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("README has no {heading:?}"));
    let body = &text[start + heading.len() + 2..];
    &body[..body.find("\n## ").unwrap_or(body.len())]
}

/// Every `--flag` named in `text`.
fn flags_in(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("--") {
        let name: String = rest[i + 2..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        if name.chars().next().is_some_and(|c| c.is_ascii_lowercase()) {
            out.push(name.clone());
        }
        rest = &rest[i + 2 + name.len()..];
    }
    out
}

/// A documented default: `None` for "no default" (the table says none, off, hostname...).
fn documented_default(cell: &str) -> Option<String> {
    let cell = cell.trim();
    cell.strip_prefix('`')
        .and_then(|c| c.strip_suffix('`'))
        .map(str::to_string)
}

/// The flag table under "## Running it": flag → its documented default.
fn readme_flag_table(section: &str) -> BTreeMap<String, Option<String>> {
    let mut out = BTreeMap::new();
    for row in section.lines().filter(|l| l.starts_with("| `--")) {
        let row = row.replace("\\|", "¦");
        let cells: Vec<&str> = row.trim().trim_matches('|').split('|').collect();
        assert!(cells.len() >= 3, "a flag row has three cells: {row}");
        let flags = flags_in(cells[0]);
        let defaults: Vec<&str> = cells[1].split(" / ").collect();
        for (i, f) in flags.iter().enumerate() {
            // One default per flag ("`text` / `info`"), or one for all of them.
            let d = if defaults.len() == flags.len() {
                defaults[i]
            } else {
                cells[1]
            };
            assert!(
                out.insert(f.clone(), documented_default(d)).is_none(),
                "--{f} has two rows"
            );
        }
    }
    out
}

/// The flags `loopvol serve` takes, as clap knows them (hidden test flags left out), with
/// their defaults.
fn serve_flags() -> BTreeMap<String, Option<String>> {
    let cli = loopvol::cli::Cli::command();
    let serve = cli.find_subcommand("serve").expect("a serve subcommand");
    serve
        .get_arguments()
        .filter(|a| !a.is_hide_set())
        .filter_map(|a| {
            let long = a.get_long()?;
            let default = a
                .get_default_values()
                .iter()
                .map(|v| v.to_string_lossy().into_owned())
                .collect::<Vec<_>>();
            Some((
                long.to_string(),
                (!default.is_empty()).then(|| default.join(",")),
            ))
        })
        .filter(|(long, _)| long != "help")
        .collect()
}

/// Two defaults agree when equal as text or as numbers (`1.0` and `1`).
fn same_default(a: &str, b: &str) -> bool {
    a == b || matches!((a.parse::<f64>(), b.parse::<f64>()), (Ok(x), Ok(y)) if x == y)
}

/// What the README's table gets wrong against clap: missing flags, extra flags, defaults.
fn disagreements(
    documented: &BTreeMap<String, Option<String>>,
    real: &BTreeMap<String, Option<String>>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (flag, default) in real {
        match documented.get(flag) {
            None => out.push(format!("--{flag} is missing from the README's table")),
            Some(doc) => match (doc, default) {
                (Some(d), Some(r)) if !same_default(d, r) => out.push(format!(
                    "--{flag}: the README says default `{d}`, serve's is `{r}`"
                )),
                (Some(d), None) => out.push(format!(
                    "--{flag}: the README says default `{d}`, serve has none"
                )),
                (None, Some(r)) => out.push(format!(
                    "--{flag}: serve's default `{r}` is not in the README"
                )),
                _ => {}
            },
        }
    }
    for flag in documented.keys().filter(|f| !real.contains_key(*f)) {
        out.push(format!(
            "--{flag} is in the README's table but not in serve"
        ));
    }
    out
}

#[test]
fn readme_serve_flag_table_is_serve_help() {
    let text = readme();
    let running = section(&text, "## Running it");
    let wrong = disagreements(&readme_flag_table(running), &serve_flags());
    assert!(
        wrong.is_empty(),
        "README vs `loopvol serve`:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn readme_serve_synopsis_names_every_flag() {
    let text = readme();
    let running = section(&text, "## Running it");
    let block = running
        .split("```")
        .nth(1)
        .expect("a synopsis code block under Running it");
    assert!(block.contains("loopvol serve"), "{block}");
    let synopsis: BTreeSet<String> = flags_in(block).into_iter().collect();
    let real: BTreeSet<String> = serve_flags().into_keys().collect();
    let missing: Vec<_> = real.difference(&synopsis).collect();
    let extra: Vec<_> = synopsis.difference(&real).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "synopsis lacks {missing:?}, names unknown {extra:?}"
    );
}

/// The check itself catches a missing flag, an extra one and a wrong default.
#[test]
fn the_flag_check_sees_missing_extra_and_wrong_defaults() {
    let table = "\
| flag | default | meaning |
|---|---|---|
| `--mode` | `all` | m |
| `--log-format` / `--log-level` | `text` / `debug` | l |
| `--tls-cert` `--tls-key` | | t |
| `--gone` | off | g |
";
    let real: BTreeMap<String, Option<String>> = [
        ("mode", Some("all")),
        ("log-format", Some("text")),
        ("log-level", Some("info")),
        ("tls-cert", None),
        ("tls-key", None),
        ("overcommit-ratio", Some("1")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
    .collect();
    let wrong = disagreements(&readme_flag_table(table), &real);
    assert_eq!(
        wrong,
        [
            "--log-level: the README says default `debug`, serve's is `info`",
            "--overcommit-ratio is missing from the README's table",
            "--gone is in the README's table but not in serve",
        ],
        "{wrong:#?}"
    );
    let fixed = table
        .replace("`debug`", "`info`")
        .replace("| `--gone` | off | g |\n", "")
        + "| `--overcommit-ratio` | `1.0` | o |\n";
    assert!(disagreements(&readme_flag_table(&fixed), &real).is_empty());
}

/// The capability names after `label` in the README's sentence "controller A, B; node C, D;".
fn listed_after<'a>(sentence: &'a str, label: &str) -> BTreeSet<&'a str> {
    let start = sentence
        .find(&format!(" {label} "))
        .unwrap_or_else(|| panic!("no {label} list in {sentence:?}"));
    let list = &sentence[start + label.len() + 2..];
    list[..list.find(';').unwrap()]
        .split(',')
        .map(str::trim)
        .collect()
}

#[test]
fn readme_lists_the_default_capabilities() {
    let text = readme().replace('\n', " ");
    let start = text
        .find("So by default loopvol advertises")
        .expect("the default capability sentence");
    let sentence = &text[start..];
    let adv = loopvol::shared::advertise::Advertised::default();
    let controller: BTreeSet<&str> = adv.controller().iter().map(|c| c.as_str_name()).collect();
    let node: BTreeSet<&str> = adv.node().iter().map(|c| c.as_str_name()).collect();
    assert_eq!(listed_after(sentence, "controller"), controller);
    assert_eq!(listed_after(sentence, "node"), node);
}

/// docs/operations.md: command errors are one `error:` line with status 1; usage errors are
/// clap's, several lines with status 2.
#[test]
fn cli_errors_are_as_documented() {
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_loopvol"))
            .args(args)
            .output()
            .unwrap()
    };
    let ops = std::fs::read_to_string(repo().join("docs/operations.md")).unwrap();
    assert!(
        ops.contains("exit status 2"),
        "operations.md tells of usage errors"
    );
    for usage in [&["serve", "--no-such-flag"][..], &["volume", "inspect"]] {
        let out = run(usage);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{usage:?}: {err}");
        assert!(
            err.starts_with("error: ") && err.contains("\nUsage: loopvol "),
            "{err}"
        );
        assert!(err.lines().count() > 1, "{err}");
    }
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let out = run(&[
        "volume",
        "inspect",
        "--pool-dir",
        pool.to_str().unwrap(),
        "vol-x",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("error: ") && err.lines().count() == 1,
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Sentences in the sources.

/// Every string literal of `src` that is not raw: (line number, its source text).
fn string_literals(src: &str) -> Vec<(usize, &str)> {
    let b = src.as_bytes();
    let (mut i, mut out) = (0, Vec::new());
    let line = |i: usize| src[..i].matches('\n').count() + 1;
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                i = src[i..].find('\n').map_or(b.len(), |n| i + n);
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i = src[i..].find("*/").map_or(b.len(), |n| i + n + 2);
            }
            // A char literal ('"', '\'') or a lifetime.
            b'\'' => {
                if b.get(i + 1) == Some(&b'\\') {
                    i += src[i + 2..].find('\'').map_or(b.len(), |n| n + 3);
                } else if b.get(i + 2) == Some(&b'\'') {
                    i += 3;
                } else {
                    i += 1;
                }
            }
            b'r' if (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_'))
                && src[i + 1..].trim_start_matches('#').starts_with('"') =>
            {
                let hashes = src[i + 1..].len() - src[i + 1..].trim_start_matches('#').len();
                let open = i + 1 + hashes + 1;
                let close = format!("\"{}", "#".repeat(hashes));
                i = src[open..]
                    .find(&close)
                    .map_or(b.len(), |n| open + n + close.len());
            }
            b'"' => {
                let start = i + 1;
                let mut j = start;
                while j < b.len() && b[j] != b'"' {
                    j += if b[j] == b'\\' { 2 } else { 1 };
                }
                out.push((line(start), &src[start..j.min(b.len())]));
                i = j + 1;
            }
            _ => i += 1,
        }
    }
    out
}

/// A run of three or more spaces inside a sentence of `literal` (its source text): after some
/// words and before a lower-case word, past any continuation indentation. The padding after a
/// one-word label (`"staged       no"`) and table columns (followed by a placeholder or a
/// capital) are not sentences.
fn broken_sentence(literal: &str) -> bool {
    literal.split('\n').any(|piece| {
        let piece = piece.trim_start();
        piece.match_indices("   ").any(|(at, _)| {
            let next = piece[at..].trim_start_matches(' ').chars().next();
            piece[..at].trim_end().contains(' ')
                && next.is_some_and(|c| c.is_ascii_lowercase() || c == '(' || c == '`')
        })
    })
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn no_message_has_a_run_of_spaces_inside_a_sentence() {
    let mut files = Vec::new();
    for dir in ["driver/src", "provisioner/src", "bench/src"] {
        rust_files(&repo().join(dir), &mut files);
    }
    let mut broken = Vec::new();
    for f in &files {
        let src = std::fs::read_to_string(f).unwrap();
        for (line, lit) in string_literals(&src) {
            if broken_sentence(lit) {
                broken.push(format!("{}:{line}: {lit:?}", f.display()));
            }
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
    // The scan finds what it looks for.
    let bad = "let m = format!(\n    \"the kernel forced {} read-only;                  run fsck\",\n    x);\n";
    let lits = string_literals(bad);
    assert_eq!(lits.len(), 1, "{lits:?}");
    assert!(broken_sentence(lits[0].1));
    let fine = "println!(\"size         {} ({} bytes)\", a, b); let c = '\"'; \
                let s = \"one \\\n           two\"; let r = r#\"a   b\"#; \
                println!(\"staged       no\");";
    let lits = string_literals(fine);
    assert_eq!(lits.len(), 3, "{lits:?}");
    assert!(lits.iter().all(|(_, l)| !broken_sentence(l)), "{lits:?}");
}

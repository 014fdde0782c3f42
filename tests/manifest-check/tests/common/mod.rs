//! Helpers shared by the integration tests.

#![allow(dead_code)]

use manifest_check::{check_files, read_manifests, repo_root, SourceFile};

/// The repository's real manifest files.
pub fn real_files() -> Vec<SourceFile> {
    read_manifests(repo_root()).expect("read manifests/")
}

/// Findings for the real manifests after applying `edits` (file, from, to); each `from` must
/// occur in its file, so a test never passes just because the manifests moved on.
pub fn findings_after(edits: &[(&str, &str, &str)]) -> Vec<String> {
    let mut files = real_files();
    for (path, from, to) in edits {
        let file = files
            .iter_mut()
            .find(|f| f.path == *path)
            .unwrap_or_else(|| panic!("no file {path}"));
        assert!(
            file.text.contains(from),
            "{path} no longer contains {from:?}; update this test"
        );
        file.text = file.text.replacen(from, to, 1);
    }
    strings(check_files(files))
}

/// Findings for the real manifests plus one extra file.
pub fn findings_with_extra_file(path: &str, text: &str) -> Vec<String> {
    let mut files = real_files();
    files.push(SourceFile::new(path, text));
    strings(check_files(files))
}

fn strings(findings: Vec<manifest_check::Finding>) -> Vec<String> {
    findings.iter().map(ToString::to_string).collect()
}

/// The findings are exactly `expected` (in any order).
pub fn assert_exactly(findings: &[String], expected: &[&str]) {
    let mut got: Vec<&str> = findings.iter().map(String::as_str).collect();
    let mut want: Vec<&str> = expected.to_vec();
    got.sort();
    want.sort();
    assert_eq!(got, want, "\ngot:\n  {}\n", findings.join("\n  "));
}

/// Among the findings is `expected`.
pub fn assert_reports(findings: &[String], expected: &str) {
    assert!(
        findings.iter().any(|f| f == expected),
        "expected:\n  {expected}\ngot:\n  {}",
        findings.join("\n  ")
    );
}

//! `amictl iam-policy` covers what the code calls.
//!
//! The source under `builder/src` is read, not run: every IAM action it names (the first
//! argument of `crate::aws::classify` and of the helpers that pass theirs on to it,
//! `action: "..."` in errors, any other `"service:Action"` literal) must be in the policy
//! the real binary prints for all scopes. And every AWS SDK call must name its action:
//! each `.send()` must have, in the same statement (or, for `let x = ....send()...;`, in a
//! later statement of the same block that uses `x`), a classifier call with a literal
//! action. An SDK call that forgets it fails here with its file, line and the fix, since
//! its action could be missing from the policy without anyone noticing.
//!
//! The reading is lexical (comments, strings and `#[cfg(test)]` items are told apart from
//! code), not a Rust parser: a construct it cannot follow goes into `ALLOWED_UNCLASSIFIED`
//! with its reason, and an entry that no longer matches anything fails, so the list only
//! holds what is true.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// AWS service prefixes whose `"service:Action"` literals are IAM actions.
const SERVICES: &[&str] = &[
    "autoscaling",
    "cloudformation",
    "cloudwatch",
    "ebs",
    "ec2",
    "elasticloadbalancing",
    "iam",
    "kms",
    "logs",
    "s3",
    "ssm",
    "sts",
];

/// An SDK call site that is not classified, with why.
struct Allowed {
    /// Relative to `builder/`.
    file: &'static str,
    /// Text on the `.send()` line (or the waiter's line).
    snippet: &'static str,
    /// The IAM action the call needs (checked against the policy like the others).
    action: &'static str,
    why: &'static str,
}

const ALLOWED_UNCLASSIFIED: &[Allowed] = &[];

// ---- reading Rust source ---------------------------------------------------------------

/// At a raw string's start (`r"`, `r#"`, `br"`, ...): its number of `#`s and where its
/// content starts. Not a raw identifier (`r#type`).
fn raw_string(c: &[char], i: usize) -> Option<(usize, usize)> {
    if i > 0 && (c[i - 1].is_alphanumeric() || c[i - 1] == '_') {
        return None;
    }
    let mut j = i;
    if c.get(j) == Some(&'b') {
        j += 1;
    }
    if c.get(j) != Some(&'r') {
        return None;
    }
    j += 1;
    let mut hashes = 0;
    while c.get(j) == Some(&'#') {
        hashes += 1;
        j += 1;
    }
    (c.get(j) == Some(&'"')).then_some((hashes, j + 1))
}

/// `src` with comments blanked, string literals kept as `"..."` with their brackets,
/// semicolons, quotes and escapes replaced by `_`, and char literals as `'_'`. Newlines are
/// kept, so line numbers stay right.
fn sanitize(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let blank = |ch: char| if ch == '\n' { '\n' } else { ' ' };
    let in_str = |ch: char| match ch {
        '(' | ')' | '{' | '}' | '[' | ']' | ';' | '\\' | '"' | '\'' => '_',
        other => other,
    };
    let mut i = 0;
    while i < c.len() {
        if let Some((hashes, content)) = raw_string(&c, i) {
            let close: Vec<char> = std::iter::once('"')
                .chain(std::iter::repeat_n('#', hashes))
                .collect();
            out.push('"');
            let mut j = content;
            while j < c.len() && !c[j..].starts_with(&close) {
                out.push(in_str(c[j]));
                j += 1;
            }
            out.push('"');
            i = j + close.len();
            continue;
        }
        match c[i] {
            '/' if c.get(i + 1) == Some(&'/') => {
                while i < c.len() && c[i] != '\n' {
                    out.push(' ');
                    i += 1;
                }
            }
            '/' if c.get(i + 1) == Some(&'*') => {
                let mut depth = 0;
                while i < c.len() {
                    if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                        depth += 1;
                        out.push_str("  ");
                        i += 2;
                    } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                        depth -= 1;
                        out.push_str("  ");
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        out.push(blank(c[i]));
                        i += 1;
                    }
                }
            }
            '"' => {
                out.push('"');
                i += 1;
                while i < c.len() && c[i] != '"' {
                    if c[i] == '\\' {
                        out.push('_');
                        i += 1;
                        if i < c.len() {
                            out.push(if c[i] == '\n' { '\n' } else { '_' });
                            i += 1;
                        }
                        continue;
                    }
                    out.push(in_str(c[i]));
                    i += 1;
                }
                out.push('"');
                i += 1;
            }
            // A char literal ('x', '\n', '\'', '{'), not a lifetime ('a, 'static).
            '\'' if c.get(i + 1) == Some(&'\\') => {
                out.push_str("'__");
                i += 3;
                while i < c.len() && c[i] != '\'' {
                    out.push('_');
                    i += 1;
                }
                out.push('\'');
                i += 1;
            }
            '\'' if c.get(i + 2) == Some(&'\'') => {
                out.push_str("'_'");
                i += 3;
            }
            ch => {
                out.push(ch);
                i += 1;
            }
        }
    }
    out
}

fn line_of(text: &str, at: usize) -> usize {
    text[..at].matches('\n').count() + 1
}

/// The index just past the bracket that closes the one at `open`.
fn matching(code: &[u8], open: usize) -> usize {
    let mut depth = 0i32;
    for (i, b) in code.iter().enumerate().skip(open) {
        match b {
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
    }
    code.len()
}

/// Blanks every `#[cfg(test)]` item (a `mod tests { .. }`, a `mod tests;`, a test-only fn
/// or impl): tests may call fakes however they like.
fn strip_test_items(code: &str) -> String {
    let mut bytes = code.as_bytes().to_vec();
    let mut from = 0;
    while let Some(found) = find_from(&bytes, b"#[cfg(test)]", from) {
        let mut i = found + "#[cfg(test)]".len();
        // Further attributes, then the item up to its `;` or its braces.
        let end = loop {
            while i < bytes.len() && bytes[i].is_ascii_whitespace() {
                i += 1;
            }
            if bytes.get(i) == Some(&b'#') && bytes.get(i + 1) == Some(&b'[') {
                i = matching(&bytes, i + 1);
                continue;
            }
            let mut j = i;
            let mut depth = 0;
            break loop {
                match bytes.get(j) {
                    None => break bytes.len(),
                    Some(b'(') | Some(b'[') => depth += 1,
                    Some(b')') | Some(b']') => depth -= 1,
                    Some(b';') if depth == 0 => break j + 1,
                    Some(b'{') if depth == 0 => break matching(&bytes, j),
                    _ => {}
                }
                j += 1;
            };
        };
        for b in &mut bytes[found..end] {
            if *b != b'\n' {
                *b = b' ';
            }
        }
        from = end;
    }
    String::from_utf8(bytes).expect("blanking keeps UTF-8: only ASCII is replaced")
}

fn find_from(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    hay.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

fn is_action(s: &str) -> bool {
    match s.split_once(':') {
        Some((service, name)) => {
            SERVICES.contains(&service)
                && name.starts_with(|c: char| c.is_ascii_uppercase())
                && name.chars().all(|c| c.is_ascii_alphanumeric())
        }
        None => false,
    }
}

/// Functions that take `action: &'static str` and hand it to `classify(action, ..)`: calls
/// to them classify as `classify` does.
fn classifier_helpers(code: &str) -> BTreeSet<String> {
    let bytes = code.as_bytes();
    let mut out = BTreeSet::new();
    let mut from = 0;
    while let Some(at) = find_from(bytes, b"fn ", from) {
        from = at + 3;
        if at > 0 && is_ident(bytes[at - 1]) {
            continue;
        }
        let name: String = code[at + 3..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        // The signature runs to the body's `{` (or a `;` for a body-less declaration).
        let Some(rel) = code[at..].find(['{', ';']) else {
            continue;
        };
        let open = at + rel;
        if bytes[open] == b';' {
            continue;
        }
        let signature = &code[at..open];
        let body = &code[open..matching(bytes, open)];
        if signature.contains("action: &'static str") && body.contains("classify(action") {
            out.insert(name);
        }
    }
    out
}

/// Classifier calls with a literal action in `region`: (offset, action).
fn classified_actions(region: &str, classifiers: &BTreeSet<String>) -> Vec<(usize, String)> {
    let bytes = region.as_bytes();
    let mut out = Vec::new();
    for name in classifiers {
        let pattern = format!("{name}(");
        let mut from = 0;
        while let Some(at) = find_from(bytes, pattern.as_bytes(), from) {
            from = at + pattern.len();
            if at > 0 && (is_ident(bytes[at - 1]) || bytes[at - 1] == b'.') {
                continue;
            }
            let rest = region[from..].trim_start();
            if let Some(lit) = rest.strip_prefix('"') {
                let action = &lit[..lit.find('"').unwrap_or(0)];
                out.push((at, action.to_owned()));
            }
        }
    }
    out
}

/// Where the statement from `start` ends: a `;` at its own level, a `}` that closes a block
/// it opened (a `match`, `while`, `if` statement), or the end of the enclosing block. A
/// `)` it did not open climbs out of a call (`Ok(c.x().send().await?)`, `retry(|| ..)`),
/// so the statement that holds the call is what counts.
fn statement_end(code: &[u8], start: usize) -> usize {
    let mut depth = 0i32;
    let mut floor = 0i32;
    for (i, b) in code.iter().enumerate().skip(start) {
        match b {
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' => {
                depth -= 1;
                floor = floor.min(depth);
            }
            b'}' => {
                depth -= 1;
                if depth < floor {
                    return i;
                }
                if depth == floor {
                    return i + 1;
                }
            }
            b';' if depth == floor => return i + 1,
            _ => {}
        }
    }
    code.len()
}

/// Where the statement that contains `at` starts.
fn statement_start(code: &[u8], at: usize) -> usize {
    let mut depth = 0i32;
    for i in (0..at).rev() {
        match code[i] {
            b')' | b']' => depth += 1,
            b'}' if depth == 0 => return i + 1,
            b'}' => depth += 1,
            b'(' | b'[' | b'{' if depth == 0 => return i + 1,
            b'(' | b'[' | b'{' => depth -= 1,
            b';' if depth == 0 => return i + 1,
            _ => {}
        }
    }
    0
}

/// The variable a `let NAME = ...;` statement binds, if it is that simple.
fn let_binding(statement: &str) -> Option<&str> {
    let rest = statement.trim_start().strip_prefix("let ")?.trim_start();
    let rest = rest.strip_prefix("mut ").unwrap_or(rest).trim_start();
    let end = rest
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(rest.len());
    let (name, after) = rest.split_at(end);
    let after = after.trim_start();
    (!name.is_empty() && (after.starts_with('=') || after.starts_with(':'))).then_some(name)
}

fn mentions(text: &str, word: &str) -> bool {
    let bytes = text.as_bytes();
    let mut from = 0;
    while let Some(at) = find_from(bytes, word.as_bytes(), from) {
        let end = at + word.len();
        let before = at == 0 || !is_ident(bytes[at - 1]);
        let after = end >= bytes.len() || !is_ident(bytes[end]);
        if before && after {
            return true;
        }
        from = end;
    }
    false
}

/// An SDK call site without a classifier.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Unclassified {
    line: usize,
    text: String,
}

/// The `.send()` (and waiter) sites in `code` that name no action.
fn unclassified_sends(
    code: &str,
    original: &str,
    classifiers: &BTreeSet<String>,
) -> Vec<Unclassified> {
    let bytes = code.as_bytes();
    let lines: Vec<&str> = original.lines().collect();
    let mut out = Vec::new();
    let mut sites: Vec<usize> = Vec::new();
    for needle in [&b".send()"[..], &b".wait_until_"[..]] {
        let mut from = 0;
        while let Some(at) = find_from(bytes, needle, from) {
            sites.push(at);
            from = at + needle.len();
        }
    }
    sites.sort_unstable();
    for at in sites {
        let start = statement_start(bytes, at);
        let end = statement_end(bytes, at);
        let named = !classified_actions(&code[at..end], classifiers).is_empty();
        let named = named
            || let_binding(&code[start..at]).is_some_and(|name| {
                // Later statements of the block that use the binding.
                let mut from = end;
                loop {
                    let next = statement_end(bytes, from);
                    if next <= from {
                        break false;
                    }
                    let statement = &code[from..next];
                    if mentions(statement, name)
                        && !classified_actions(statement, classifiers).is_empty()
                    {
                        break true;
                    }
                    from = next;
                    if statement.trim().is_empty() && from >= bytes.len() {
                        break false;
                    }
                }
            });
        if !named {
            let line = line_of(code, at);
            out.push(Unclassified {
                line,
                text: lines
                    .get(line - 1)
                    .map(|l| l.trim())
                    .unwrap_or("")
                    .to_owned(),
            });
        }
    }
    out
}

// ---- the source tree -------------------------------------------------------------------

struct SourceFile {
    /// Relative to `builder/`, with `/`.
    rel: String,
    original: String,
    /// Sanitized, test items blanked.
    code: String,
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// Modules declared `#[cfg(test)] mod NAME;`: (the directory their file is in, NAME).
fn test_modules(path: &Path, sanitized: &str) -> Vec<(PathBuf, String)> {
    let dir = match path.file_name().and_then(|f| f.to_str()) {
        Some("mod.rs") | Some("lib.rs") | Some("main.rs") => path.parent().unwrap().to_owned(),
        _ => path.with_extension(""),
    };
    let mut out = Vec::new();
    let mut rest = sanitized;
    while let Some(at) = rest.find("#[cfg(test)]") {
        rest = &rest[at + "#[cfg(test)]".len()..];
        let item = rest.trim_start();
        let item = item.strip_prefix("pub ").unwrap_or(item);
        if let Some(decl) = item.strip_prefix("mod ") {
            let name: String = decl
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if decl[name.len()..].trim_start().starts_with(';') {
                out.push((dir.clone(), name));
            }
        }
    }
    out
}

/// Every non-test source file of the crate.
fn sources() -> Vec<SourceFile> {
    let root = manifest_dir();
    let mut paths = Vec::new();
    rust_files(&root.join("src"), &mut paths);
    let read: Vec<(PathBuf, String, String)> = paths
        .into_iter()
        .map(|p| {
            let original = std::fs::read_to_string(&p).unwrap();
            let sanitized = sanitize(&original);
            (p, original, sanitized)
        })
        .collect();
    let mut test_only: BTreeSet<PathBuf> = BTreeSet::new();
    for (p, _, s) in &read {
        for (dir, name) in test_modules(p, s) {
            test_only.insert(dir.join(format!("{name}.rs")));
            test_only.insert(dir.join(&name).join("mod.rs"));
        }
    }
    read.into_iter()
        .filter(|(p, _, _)| !test_only.contains(p))
        .map(|(p, original, sanitized)| SourceFile {
            rel: p
                .strip_prefix(&root)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/"),
            code: strip_test_items(&sanitized),
            original,
        })
        .collect()
}

fn all_classifiers(files: &[SourceFile]) -> BTreeSet<String> {
    let mut names: BTreeSet<String> = ["classify".to_owned()].into();
    for f in files {
        names.extend(classifier_helpers(&f.code));
    }
    names
}

/// Every action the code names, with where: classifier calls, `action: "..."`, and any
/// other `"service:Action"` literal.
fn named_actions(files: &[SourceFile]) -> BTreeMap<String, Vec<String>> {
    let classifiers = all_classifiers(files);
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    // iam.rs is the policy's own data (its strings include condition keys such as
    // "iam:PassedToService"), not calls.
    for f in files.iter().filter(|f| f.rel != "src/iam.rs") {
        let mut add = |action: String, at: usize| {
            out.entry(action).or_default().push(format!(
                "builder/{}:{}",
                f.rel,
                line_of(&f.code, at)
            ));
        };
        for (at, action) in classified_actions(&f.code, &classifiers) {
            add(action, at);
        }
        let bytes = f.code.as_bytes();
        let mut from = 0;
        while let Some(at) = find_from(bytes, b"\"", from) {
            let Some(len) = f.code[at + 1..].find('"') else {
                break;
            };
            let literal = &f.code[at + 1..at + 1 + len];
            let before = f.code[..at].trim_end();
            if is_action(literal) || (before.ends_with("action:") && literal.contains(':')) {
                add(literal.to_owned(), at);
            }
            from = at + len + 2;
        }
    }
    for entries in out.values_mut() {
        entries.sort();
        entries.dedup();
    }
    out
}

// ---- the binary ------------------------------------------------------------------------

fn amictl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_amictl"))
        .arg("iam-policy")
        .args(args)
        .env_remove("AMICTL_PREFIX")
        .output()
        .expect("running amictl")
}

fn printed_policy(args: &[&str]) -> (String, serde_json::Value) {
    let out = amictl(args);
    assert!(
        out.status.success(),
        "amictl iam-policy {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"));
    (text, json)
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    match v {
        serde_json::Value::String(s) => vec![s.clone()],
        serde_json::Value::Array(a) => a
            .iter()
            .map(|x| x.as_str().expect("a list of strings").to_owned())
            .collect(),
        other => panic!("expected a string or a list of strings, got {other}"),
    }
}

fn policy_actions(policy: &serde_json::Value) -> BTreeSet<String> {
    policy["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| strings(&s["Action"]))
        .collect()
}

// ---- the tests -------------------------------------------------------------------------

#[test]
fn the_policy_grants_every_action_the_code_names() {
    let files = sources();
    assert!(
        files.iter().any(|f| f.rel == "src/aws.rs"),
        "the source walk found no src/aws.rs"
    );
    let named = named_actions(&files);
    for must in [
        "ec2:RunInstances",
        "ebs:PutSnapshotBlock",
        "ssm:SendCommand",
    ] {
        assert!(
            named.contains_key(must),
            "the scan missed {must}: {named:?}"
        );
    }
    let (_, policy) = printed_policy(&["--scope", "all"]);
    let granted = policy_actions(&policy);
    let mut missing = Vec::new();
    for (action, wheres) in &named {
        if !granted.contains(action) {
            missing.push(format!("{action} (named at {})", wheres.join(", ")));
        }
    }
    for a in ALLOWED_UNCLASSIFIED {
        if !granted.contains(a.action) {
            missing.push(format!("{} (called at builder/{})", a.action, a.file));
        }
    }
    assert!(
        missing.is_empty(),
        "`amictl iam-policy` lacks actions the code calls:\n  {}\nadd each to a grant in builder/src/iam.rs (GRANTS), for the scopes whose commands call it, on the narrowest resources AWS supports for it",
        missing.join("\n  ")
    );
}

#[test]
fn every_sdk_call_names_its_iam_action() {
    let files = sources();
    let classifiers = all_classifiers(&files);
    assert!(classifiers.contains("classify"));
    let mut used = vec![false; ALLOWED_UNCLASSIFIED.len()];
    let mut problems = Vec::new();
    let mut sites = 0;
    for f in &files {
        sites += f.code.matches(".send()").count();
        for u in unclassified_sends(&f.code, &f.original, &classifiers) {
            let allowed = ALLOWED_UNCLASSIFIED
                .iter()
                .position(|a| a.file == f.rel && u.text.contains(a.snippet));
            match allowed {
                Some(i) => used[i] = true,
                None => problems.push(format!("builder/{}:{}: {}", f.rel, u.line, u.text)),
            }
        }
    }
    assert!(
        sites > 20,
        "found only {sites} .send() sites: is the scan reading the source?"
    );
    assert!(
        problems.is_empty(),
        "AWS SDK calls whose errors name no IAM action:\n  {}\n\
         Map the call's error with `crate::aws::classify(\"service:Action\", e)` in the same \
         statement (or in the statement that handles the `let` result), or through a helper \
         that takes `action: &'static str` and calls `classify(action, ..)`; then make sure \
         `amictl iam-policy` grants that action (builder/src/iam.rs). A deliberate exception \
         goes into ALLOWED_UNCLASSIFIED in builder/tests/it/iam_policy.rs with its reason.",
        problems.join("\n  ")
    );
    let stale: Vec<String> = ALLOWED_UNCLASSIFIED
        .iter()
        .zip(&used)
        .filter(|(_, used)| !**used)
        .map(|(a, _)| format!("builder/{}: {} ({})", a.file, a.snippet, a.why))
        .collect();
    assert!(
        stale.is_empty(),
        "ALLOWED_UNCLASSIFIED entries that match no unclassified call any more (remove them):\n  {}",
        stale.join("\n  ")
    );
}

#[test]
fn no_action_is_a_wildcard() {
    let scopes = [
        "all", "publish", "rollout", "health", "drift", "destroy", "stack",
    ];
    for scope in scopes {
        let (_, policy) = printed_policy(&["--scope", scope]);
        let actions = policy_actions(&policy);
        assert!(!actions.is_empty(), "{scope}");
        for a in &actions {
            assert!(
                !a.contains('*')
                    && !a.contains('?')
                    && a.split_once(':')
                        .is_some_and(|(s, n)| !s.is_empty() && !n.is_empty()),
                "--scope {scope}: action {a:?} is a wildcard or malformed"
            );
        }
    }
}

#[test]
fn the_document_has_the_shape_of_an_iam_policy() {
    let (_, policy) = printed_policy(&[]);
    let top = policy.as_object().unwrap();
    assert_eq!(
        top.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        BTreeSet::from(["Statement", "Version"])
    );
    assert_eq!(policy["Version"], "2012-10-17");
    let statements = policy["Statement"].as_array().expect("Statement is a list");
    assert!(!statements.is_empty());
    let mut sids = BTreeSet::new();
    for s in statements {
        let obj = s.as_object().expect("a statement is an object");
        for key in obj.keys() {
            assert!(
                ["Sid", "Effect", "Action", "Resource", "Condition"].contains(&key.as_str()),
                "unexpected key {key} in {s}"
            );
        }
        let sid = s["Sid"].as_str().expect("every statement has a Sid");
        assert!(
            !sid.is_empty() && sid.chars().all(|c| c.is_ascii_alphanumeric()),
            "IAM takes only [A-Za-z0-9] in a Sid: {sid}"
        );
        assert!(sids.insert(sid.to_owned()), "Sid {sid} twice");
        assert_eq!(s["Effect"], "Allow", "{sid}");
        assert!(!strings(&s["Action"]).is_empty(), "{sid}");
        let resources = strings(&s["Resource"]);
        assert!(!resources.is_empty(), "{sid}");
        for r in &resources {
            assert!(r == "*" || r.starts_with("arn:aws:"), "{sid}: {r}");
        }
        if let Some(c) = s.get("Condition") {
            for (op, keys) in c.as_object().expect("Condition is an object") {
                for (key, values) in keys.as_object().expect("operator maps keys") {
                    assert!(!strings(values).is_empty(), "{sid}: {op} {key}");
                }
            }
        }
    }
}

#[test]
fn every_statements_actions_are_sorted_and_unique() {
    let (_, policy) = printed_policy(&[]);
    for s in policy["Statement"].as_array().unwrap() {
        let actions = strings(&s["Action"]);
        let mut sorted = actions.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(actions, sorted, "{}", s["Sid"]);
    }
}

#[test]
fn the_output_is_deterministic() {
    let (a, _) = printed_policy(&[]);
    let (b, _) = printed_policy(&[]);
    assert_eq!(a, b, "two runs differ");
    let (all, _) = printed_policy(&["--scope", "all"]);
    assert_eq!(a, all, "no --scope is --scope all");
    let (x, _) = printed_policy(&["--scope", "rollout", "--scope", "publish"]);
    let (y, _) = printed_policy(&[
        "--scope", "publish", "--scope", "rollout", "--scope", "publish",
    ]);
    assert_eq!(x, y, "the order and repetition of --scope do not matter");
    let every: Vec<&str> = ["publish", "rollout", "health", "drift", "destroy", "stack"]
        .iter()
        .flat_map(|s| ["--scope", s])
        .collect();
    let (z, _) = printed_policy(&every);
    assert_eq!(a, z, "every scope is all");
}

#[test]
fn scopes_and_target_narrow_the_policy() {
    let (_, destroy) = printed_policy(&["--scope", "destroy"]);
    assert_eq!(
        policy_actions(&destroy),
        BTreeSet::from(
            [
                "autoscaling:DeleteAutoScalingGroup",
                "autoscaling:DescribeAutoScalingGroups",
                "cloudformation:DescribeStacks",
                "ec2:DeleteLaunchTemplate",
                "ec2:DescribeInstances",
                "ec2:TerminateInstances",
                // The fleet's lock.
                "s3:DeleteObject",
                "s3:GetObject",
                "s3:ListBucket",
                "s3:PutObject",
            ]
            .map(str::to_owned)
        )
    );
    let (text, _) = printed_policy(&[
        "--scope",
        "stack",
        "--prefix",
        "web-",
        "--account",
        "123456789012",
        "--region",
        "eu-west-1",
    ]);
    assert!(
        text.contains("arn:aws:cloudformation:eu-west-1:123456789012:stack/web-*/*"),
        "{text}"
    );
    assert!(
        text.contains("arn:aws:s3:::web-*import-123456789012-eu-west-1"),
        "{text}"
    );
    assert!(
        !text.contains("stack/amictl-") && !text.contains("s3:::amictl-"),
        "the prefix replaces the default one: {text}"
    );
}

#[test]
fn split_writes_managed_policies_within_the_limit_that_add_up_to_the_whole() {
    let wide = [
        "--account",
        "123456789012",
        "--region",
        "us-east-1",
        "--region",
        "eu-west-1",
        "--region",
        "us-west-2",
    ];
    let (_, whole) = printed_policy(&wide);
    let dir = tempfile::tempdir().unwrap();
    let mut args = wide.to_vec();
    args.extend(["--split", dir.path().to_str().unwrap()]);
    let out = amictl(&args);
    assert_eq!(out.status.code(), Some(0));
    let listing = String::from_utf8(out.stdout).unwrap();
    let mut statements = Vec::new();
    for (i, line) in listing.lines().enumerate() {
        let path = dir.path().join(format!("amictl-policy-{}.json", i + 1));
        assert!(line.starts_with(path.to_str().unwrap()), "{line}");
        let text = std::fs::read_to_string(&path).unwrap();
        let part: serde_json::Value = serde_json::from_str(&text).unwrap();
        let size = serde_json::to_string(&part).unwrap().len();
        assert!(size <= 6144, "{} is {size} characters", path.display());
        statements.extend(part["Statement"].as_array().unwrap().iter().cloned());
    }
    assert!(listing.lines().count() >= 2, "{listing}");
    assert_eq!(&statements, whole["Statement"].as_array().unwrap());
}

#[test]
fn invalid_input_prints_nothing_and_exits_2() {
    for args in [
        &["--account", "12345"][..],
        &["--region", "*"][..],
        &["--prefix", "a*"][..],
        &["--partition", "gcp"][..],
    ] {
        let out = amictl(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("error:"),
            "{args:?}"
        );
    }
}

// ---- the scanner itself ------------------------------------------------------------------

fn scan(src: &str) -> Vec<usize> {
    let code = strip_test_items(&sanitize(src));
    let mut classifiers: BTreeSet<String> = ["classify".to_owned()].into();
    classifiers.extend(classifier_helpers(&code));
    unclassified_sends(&code, src, &classifiers)
        .into_iter()
        .map(|u| u.line)
        .collect()
}

#[test]
fn the_scanner_flags_an_sdk_call_that_names_no_action() {
    let src = r#"
async fn unnamed(c: &Client) -> Result<(), E> {
    let out = c.describe_vpcs().send().await?;
    c.delete_vpc().vpc_id("v").send().await.map_err(Into::into)?;
    Ok(())
}
"#;
    assert_eq!(scan(src), [3, 4]);
    // A later classify of something else does not count for an unrelated binding.
    let src = r#"
async fn f(c: &Client) -> Result<(), E> {
    let a = c.describe_vpcs().send().await;
    let b = c.describe_subnets().send().await.map_err(|e| classify("ec2:DescribeSubnets", e))?;
    Ok(())
}
"#;
    assert_eq!(scan(src), [3]);
    // Inside a call, the statement that holds the call counts.
    let src = r#"
async fn wrapped(c: &Client) -> Result<(), E> {
    let a = retry(|| c.describe_vpcs().send()).await.map_err(|e| classify("ec2:DescribeVpcs", e))?;
    Ok(c.describe_subnets().send().await?)
}
"#;
    assert_eq!(scan(src), [4]);
    // A waiter names no action either.
    let src = "fn w(c: &Client) { c.wait_until_instance_running().wait(d); }";
    assert_eq!(scan(src), [1]);
}

#[test]
fn the_scanner_accepts_the_ways_the_code_classifies() {
    let src = r#"
use crate::aws::classify;

fn s3_error<E>(action: &'static str, err: SdkError<E>) -> AwsError {
    match err.code() {
        Some("NoSuchKey") => AwsError::NotFound(action.into()),
        _ => classify(action, err),
    }
}

async fn inline(c: &Client) -> Result<(), AwsError> {
    c.start_snapshot()
        .send()
        .await
        .map_err(|e| classify("ebs:StartSnapshot", e))?;
    c.put_object().send().await.map_err(|e| s3_error("s3:PutObject", e))?;
    Ok(())
}

async fn matched(c: &Client) -> Result<(), AwsError> {
    match c.deregister_image().image_id("ami-1").send().await {
        Ok(_) => Ok(()),
        Err(e) if code(&e) == Some("{;'") => Ok(()),
        Err(e) => Err(crate::aws::classify(
            "ec2:DeregisterImage",
            e,
        )),
    }
}

async fn bound(c: &Client) -> Result<(), AwsError> {
    let mut pages = c.describe_images().into_paginator().send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| classify("ec2:DescribeImages", e))?;
    }
    let out = c.run_instances().send().await;
    let out = match out {
        Ok(o) => o,
        Err(e) => return Err(classify("ec2:RunInstances", e)),
    };
    Ok(())
}

// c.not_code().send() in a comment
const TEXT: &str = "c.not_code().send() in a string";
/* c.block().send() /* nested */ still a comment */

#[cfg(test)]
mod tests {
    fn fake(c: &Client) { c.anything().send(); }
}
"#;
    assert_eq!(scan(src), Vec::<usize>::new());
    let code = sanitize(src);
    assert!(classifier_helpers(&code).contains("s3_error"));
}

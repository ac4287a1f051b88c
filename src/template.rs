//! `{placeholder}` templates used by `message` and `dedup_key` in `rules.toml`.
//!
//! Templates are parsed once when the config is loaded, so a placeholder that names
//! nothing is a config error with a line and column instead of a silently empty string
//! in the middle of the night.

use std::fmt;

/// A parsed template: literal text and `{name}` placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Var(String),
}

/// Why a template string could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error(
        "unclosed placeholder starting at `{0}`; close it with `}}` (or write `{{{{` for a literal brace)"
    )]
    Unclosed(String),
    #[error(
        "empty placeholder `{{}}`; name a field such as `{{subject}}` (or write `{{{{` for a literal brace)"
    )]
    Empty,
    #[error("stray `}}`; write `}}}}` for a literal brace")]
    StrayClose,
    #[error(
        "placeholder `{{{0}}}` is not a valid name; use letters, digits and `_` (a regex capture name)"
    )]
    BadName(String),
}

impl Template {
    /// Parses `{name}` placeholders; `{{` and `}}` are literal braces.
    pub fn parse(source: &str) -> Result<Template, TemplateError> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = source.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|&(_, c)| c) == Some('{') => {
                    chars.next();
                    literal.push('{');
                }
                '{' => {
                    let rest = &source[i + 1..];
                    let Some(end) = rest.find('}') else {
                        return Err(TemplateError::Unclosed(
                            source[i..].chars().take(20).collect(),
                        ));
                    };
                    let name = &rest[..end];
                    if name.is_empty() {
                        return Err(TemplateError::Empty);
                    }
                    if !name.chars().all(|c| c.is_alphanumeric() || c == '_') {
                        return Err(TemplateError::BadName(name.to_string()));
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Var(name.to_string()));
                    // Skip the name and the closing brace.
                    for _ in 0..name.chars().count() + 1 {
                        chars.next();
                    }
                }
                '}' if chars.peek().map(|&(_, c)| c) == Some('}') => {
                    chars.next();
                    literal.push('}');
                }
                '}' => return Err(TemplateError::StrayClose),
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(Template {
            source: source.to_string(),
            parts,
        })
    }

    /// The placeholder names this template uses, in order of appearance.
    pub fn placeholders(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Var(name) => Some(name.as_str()),
            Part::Literal(_) => None,
        })
    }

    /// Fills the placeholders; a name `lookup` does not know renders as nothing
    /// (config validation makes that impossible for configured templates).
    pub fn render<'a>(&self, lookup: impl Fn(&str) -> Option<&'a str>) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Var(name) => out.push_str(lookup(name).unwrap_or("")),
            }
        }
        out
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(t: &str, vars: &[(&str, &str)]) -> String {
        Template::parse(t)
            .unwrap()
            .render(|n| vars.iter().find(|(k, _)| *k == n).map(|(_, v)| *v))
    }

    #[test]
    fn renders_placeholders_and_literal_braces() {
        assert_eq!(
            render("{host} is down {{really}}", &[("host", "db1")]),
            "db1 is down {really}"
        );
        assert_eq!(
            render("ホスト{host}停止", &[("host", "web")]),
            "ホストweb停止"
        );
        assert_eq!(render("{missing}!", &[]), "!");
    }

    #[test]
    fn lists_placeholders() {
        let t = Template::parse("{a} and {b_2} {{c}}").unwrap();
        assert_eq!(t.placeholders().collect::<Vec<_>>(), ["a", "b_2"]);
    }

    #[test]
    fn rejects_malformed_templates() {
        assert!(matches!(
            Template::parse("x {host"),
            Err(TemplateError::Unclosed(_))
        ));
        assert_eq!(Template::parse("{}"), Err(TemplateError::Empty));
        assert_eq!(Template::parse("a } b"), Err(TemplateError::StrayClose));
        assert!(matches!(
            Template::parse("{a b}"),
            Err(TemplateError::BadName(_))
        ));
    }
}

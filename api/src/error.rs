use std::fmt;

use thiserror::Error;

/// One problem in a config or spec, named by its field path (`services[0].port`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

#[derive(Debug, Error)]
pub enum ConfigError {
    /// The text is not YAML/JSON of the config's shape. The parser's message
    /// already names the field path and the line.
    #[error("{0}")]
    Syntax(String),
    #[error("{}", join(.0))]
    Invalid(Vec<FieldError>),
}

impl ConfigError {
    pub(crate) fn from_yaml(err: serde_yaml_ng::Error) -> Self {
        ConfigError::Syntax(err.to_string())
    }
}

fn join(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

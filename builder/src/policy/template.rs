//! Reading a CloudFormation template into the JSON the policy engine evaluates.
//!
//! Templates come as JSON or YAML, and YAML ones use CloudFormation's short-form tags (`!Ref`,
//! `!GetAtt`, `!Sub`, ...). The rules are written against the long form (`Ref`, `Fn::GetAtt`
//! as a two-element list, `Fn::Sub`), which is what CloudFormation itself turns a template
//! into, so this module does that translation once, here, and every rule sees one shape.

use serde_json::{Map, Value};
use serde_yaml::Value as Yaml;

/// Why a text is not a template the rules can be evaluated against.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("not valid JSON or YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("{0}")]
    Shape(String),
}

/// Short-form tags that become `{"Fn::<name>": value}`: CloudFormation's intrinsic functions
/// and condition functions.
const FN_TAGS: &[&str] = &[
    "And",
    "Base64",
    "Cidr",
    "Equals",
    "FindInMap",
    "ForEach",
    "GetAZs",
    "If",
    "ImportValue",
    "Join",
    "Length",
    "Not",
    "Or",
    "Select",
    "Split",
    "Sub",
    "ToJsonString",
    "Transform",
];

/// Parses `text` (JSON or YAML) into long-form JSON and checks that it has the shape of a
/// template: a mapping with a non-empty `Resources` mapping whose entries each have a `Type`.
pub fn parse(text: &str) -> Result<Value, TemplateError> {
    // JSON first: a JSON template indented with tabs is valid JSON but not valid YAML.
    let value = match serde_json::from_str::<Value>(text) {
        Ok(json) => json,
        Err(_) => to_json(serde_yaml::from_str::<Yaml>(text)?)?,
    };
    check_shape(&value)?;
    Ok(value)
}

fn shape(message: impl Into<String>) -> TemplateError {
    TemplateError::Shape(message.into())
}

fn to_json(yaml: Yaml) -> Result<Value, TemplateError> {
    Ok(match yaml {
        Yaml::Null => Value::Null,
        Yaml::Bool(b) => Value::Bool(b),
        Yaml::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                serde_json::Number::from_f64(f)
                    .map(Value::Number)
                    .ok_or_else(|| shape(format!("the number {n} has no JSON form")))?
            }
        }
        Yaml::String(s) => Value::String(s),
        Yaml::Sequence(items) => {
            Value::Array(items.into_iter().map(to_json).collect::<Result<_, _>>()?)
        }
        Yaml::Mapping(mapping) => {
            let mut object = Map::with_capacity(mapping.len());
            for (key, value) in mapping {
                object.insert(key_string(key)?, to_json(value)?);
            }
            Value::Object(object)
        }
        Yaml::Tagged(tagged) => {
            let tag = tagged.tag.to_string();
            let name = tag.trim_start_matches('!');
            let value = to_json(tagged.value)?;
            long_form(name, value).ok_or_else(|| {
                shape(format!(
                    "unknown tag {tag}: CloudFormation has no such short-form function"
                ))
            })?
        }
    })
}

/// `{"Ref": v}`, `{"Fn::GetAtt": [id, attribute]}`, `{"Fn::Sub": v}`, ...; `None` for a tag
/// CloudFormation does not define.
fn long_form(name: &str, value: Value) -> Option<Value> {
    let (key, value) = match name {
        "Ref" | "Condition" => (name.to_string(), value),
        // `!GetAtt Id.Attr.Sub` names attribute `Attr.Sub` of `Id`: logical ids have no dots.
        "GetAtt" => match value {
            Value::String(s) => match s.split_once('.') {
                Some((id, attribute)) => {
                    ("Fn::GetAtt".to_string(), serde_json::json!([id, attribute]))
                }
                None => ("Fn::GetAtt".to_string(), Value::String(s)),
            },
            other => ("Fn::GetAtt".to_string(), other),
        },
        _ if FN_TAGS.contains(&name) => (format!("Fn::{name}"), value),
        _ => return None,
    };
    let mut object = Map::with_capacity(1);
    object.insert(key, value);
    Some(Value::Object(object))
}

fn key_string(key: Yaml) -> Result<String, TemplateError> {
    match key {
        Yaml::String(s) => Ok(s),
        // `80: x` is a mapping key CloudFormation reads as the string "80".
        Yaml::Number(n) => Ok(n.to_string()),
        Yaml::Bool(b) => Ok(b.to_string()),
        other => Err(shape(format!(
            "a mapping key must be a string, found {other:?}"
        ))),
    }
}

fn check_shape(template: &Value) -> Result<(), TemplateError> {
    let top = template
        .as_object()
        .ok_or_else(|| shape("the template is not a mapping"))?;
    let resources = match top.get("Resources") {
        Some(Value::Object(resources)) => resources,
        Some(_) => return Err(shape("Resources is not a mapping")),
        None => return Err(shape("the template has no Resources section")),
    };
    if resources.is_empty() {
        // CloudFormation refuses it too, and Guard would fail every rule on it.
        return Err(shape("Resources is empty"));
    }
    for (id, resource) in resources {
        match resource.get("Type") {
            Some(Value::String(_)) => {}
            Some(_) => return Err(shape(format!("resource {id}: Type is not a string"))),
            None => return Err(shape(format!("resource {id} has no Type"))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SHORT_FORMS: &str = r#"
Resources:
  Subnet:
    Type: AWS::EC2::Subnet
    Properties:
      VpcId: !Ref Vpc
      AvailabilityZone: !Select [0, !GetAZs ""]
      CidrBlock: !GetAtt Vpc.CidrBlock
      Tags:
        - Key: Name
          Value: !Sub "${Prefix}-a"
        - Key: Joined
          Value: !Join [",", [!Ref A, !Ref B]]
        - Key: Nested
          Value: !GetAtt Db.Endpoint.Address
"#;

    #[test]
    fn short_forms_become_long_forms() {
        let t = parse(SHORT_FORMS).unwrap();
        let p = &t["Resources"]["Subnet"]["Properties"];
        assert_eq!(p["VpcId"], json!({"Ref": "Vpc"}));
        assert_eq!(
            p["AvailabilityZone"],
            json!({"Fn::Select": [0, {"Fn::GetAZs": ""}]})
        );
        assert_eq!(p["CidrBlock"], json!({"Fn::GetAtt": ["Vpc", "CidrBlock"]}));
        assert_eq!(p["Tags"][0]["Value"], json!({"Fn::Sub": "${Prefix}-a"}));
        assert_eq!(
            p["Tags"][1]["Value"],
            json!({"Fn::Join": [",", [{"Ref": "A"}, {"Ref": "B"}]]})
        );
        assert_eq!(
            p["Tags"][2]["Value"],
            json!({"Fn::GetAtt": ["Db", "Endpoint.Address"]})
        );
    }

    #[test]
    fn json_templates_parse_as_is() {
        let text = "{\n\t\"Resources\": {\"T\": {\"Type\": \"AWS::SNS::Topic\"}}\n}";
        let t = parse(text).unwrap();
        assert_eq!(t["Resources"]["T"]["Type"], "AWS::SNS::Topic");
    }

    #[test]
    fn numeric_keys_and_scalars_keep_their_meaning() {
        let t = parse(
            "Resources:\n  T:\n    Type: X\n    Properties: {80: a, B: true, C: 1.5, D: -1}\n",
        )
        .unwrap();
        let p = &t["Resources"]["T"]["Properties"];
        assert_eq!(p["80"], "a");
        assert_eq!(p["B"], true);
        assert_eq!(p["C"], 1.5);
        assert_eq!(p["D"], -1);
    }

    #[test]
    fn unknown_tags_are_refused() {
        let err = parse("Resources:\n  T:\n    Type: !Bogus x\n").unwrap_err();
        assert!(err.to_string().contains("unknown tag !Bogus"), "{err}");
    }

    #[test]
    fn what_is_not_a_template_is_refused() {
        for (text, expected) in [
            ("just a string", "not a mapping"),
            ("[1, 2]", "not a mapping"),
            ("Outputs: {}", "no Resources"),
            ("Resources: []", "not a mapping"),
            ("Resources: {}", "empty"),
            ("Resources:\n  T: {Properties: {}}\n", "T has no Type"),
            ("Resources:\n  T: {Type: [a]}\n", "Type is not a string"),
            ("Resources:\n  T: {Type: X}\n  T: {Type: Y}\n", "duplicate"),
            ("Resources: {T: {Type: X}", "not valid JSON or YAML"),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }
}

//! The least-privilege IAM policy amictl needs (pure): which actions each capability takes,
//! on which resources and under which conditions, as data ([`GRANTS`]), and the policy
//! document built from it for the scopes asked for. `amictl iam-policy` prints it;
//! `tests/iam_policy.rs` checks that it names every action the code calls.
//!
//! Rules the data follows:
//! - No wildcard actions: every action is named, so a new call is a reviewed change here.
//! - A resource ARN wherever the action supports resource-level permissions (the Service
//!   Authorization Reference), limited to the prefix's names where the ARN carries a name
//!   (CloudFormation stacks, ELB, IAM roles and instance profiles, alarms, the import
//!   bucket), to fleet instances (the `amictl:fleet` tag) for what acts on instances, and
//!   to the prefix's `amictl:prefix` tag for images, snapshots and the stack's network.
//! - `Resource: "*"` only for actions with no resource-level permissions (Describe, SSM's
//!   invocation calls) or whose documentation is unclear, and then with a condition where
//!   one is documented; each such grant says why.
//! - One statement per capability, its Sid the capability's name; a statement carries only
//!   the actions the requested scopes need, and disappears when they need none of them.

use std::collections::{BTreeMap, BTreeSet};

use serde::ser::{Serialize, SerializeSeq, Serializer};

/// What amictl is allowed to do, one scope per kind of command. Each is a value of
/// `amictl iam-policy --scope`, its doc comment the value's help.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum Scope {
    /// `image publish|build|list|gc`, with the lifecycle flags (deprecate, public, copies)
    /// and `--via s3`.
    Publish,
    /// `rollout` on AWS (launch, tag, terminate, target group, alarms, SSM health gates,
    /// the stack's outputs).
    Rollout,
    /// `health --fleet` on AWS (SSM Run Command).
    Health,
    /// `drift` on AWS (SSM Run Command).
    Drift,
    /// `destroy` on AWS (terminate a fleet's instances).
    Destroy,
    /// `stack deploy|delete`, including what CloudFormation creates with the caller's
    /// permissions (the VPC, load balancer, instance role, alarms and import bucket).
    Stack,
}

impl Scope {
    pub const ALL: [Scope; 6] = [
        Scope::Publish,
        Scope::Rollout,
        Scope::Health,
        Scope::Drift,
        Scope::Destroy,
        Scope::Stack,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scope::Publish => "publish",
            Scope::Rollout => "rollout",
            Scope::Health => "health",
            Scope::Drift => "drift",
            Scope::Destroy => "destroy",
            Scope::Stack => "stack",
        }
    }
}

/// A condition of a statement: operator, key, values. Keys and values may hold the same
/// placeholders as resources.
pub type Condition = (&'static str, &'static str, &'static [&'static str]);

/// One capability: a statement of the policy.
#[derive(Debug)]
pub struct Grant {
    /// The statement's Sid: the capability's name.
    pub sid: &'static str,
    /// Each action with the scopes that need it.
    pub actions: &'static [(&'static [Scope], &'static str)],
    /// ARN templates: `{partition}`, `{region}` (one ARN per `--region`, `*` without),
    /// `{account}` (`*` without `--account`), `{prefix}` and
    /// `{amazonaws}` (the service principal domain(s) of the partition).
    pub resources: &'static [&'static str],
    pub conditions: &'static [Condition],
}

/// The tag every fleet instance carries ([`crate::fleet::TAG_FLEET`]).
pub const FLEET_TAG: &str = "amictl:fleet";
/// amictl's SSM documents ([`crate::ssm::Document`]): `{prefix}*` before the name, like
/// the stack's other names, so a policy for `amictl-pr-` covers `amictl-pr-7-HealthCheck`.
const HEALTH_CHECK_DOCUMENT: &str =
    "arn:{partition}:ssm:{region}:{account}:document/{prefix}*HealthCheck";
const DRIFT_REPORT_DOCUMENT: &str =
    "arn:{partition}:ssm:{region}:{account}:document/{prefix}*DriftReport";
const RESTART_AGENT_DOCUMENT: &str =
    "arn:{partition}:ssm:{region}:{account}:document/{prefix}*RestartAgent";
const AMICTL_DOCUMENTS: &[&str] = &[
    HEALTH_CHECK_DOCUMENT,
    DRIFT_REPORT_DOCUMENT,
    RESTART_AGENT_DOCUMENT,
];
/// The one managed policy the stack's instance role gets (the template's
/// `ManagedPolicyArns`): attaching any other is refused, so the stack's permissions cannot
/// give a prefix role more than SSM needs.
pub const INSTANCE_ROLE_POLICY: &str = "AmazonSSMManagedInstanceCore";
/// The largest customer managed policy IAM takes, in characters without whitespace.
pub const MANAGED_POLICY_LIMIT: usize = 6144;

/// The CloudFormation resource types whose create, update and delete handlers the stack
/// scope grants (their handlers' permissions, as the CloudFormation registry schemas list
/// them). A template resource of another type needs a grant here first.
pub const STACK_RESOURCE_TYPES: &[&str] = &[
    "AWS::CloudWatch::Alarm",
    "AWS::EC2::InternetGateway",
    "AWS::EC2::Route",
    "AWS::EC2::RouteTable",
    "AWS::EC2::SecurityGroup",
    // The HTTPS ingress, added with a certificate: ec2:AuthorizeSecurityGroupIngress and
    // RevokeSecurityGroupIngress, as for the groups' own rules.
    "AWS::EC2::SecurityGroupIngress",
    "AWS::EC2::Subnet",
    "AWS::EC2::SubnetRouteTableAssociation",
    "AWS::EC2::VPC",
    "AWS::EC2::VPCGatewayAttachment",
    "AWS::ElasticLoadBalancingV2::Listener",
    "AWS::ElasticLoadBalancingV2::LoadBalancer",
    "AWS::ElasticLoadBalancingV2::TargetGroup",
    "AWS::IAM::InstanceProfile",
    "AWS::IAM::Role",
    "AWS::S3::Bucket",
    "AWS::S3::BucketPolicy",
    // amictl's documents: AmictlDocuments.
    "AWS::SSM::Document",
];

use Scope::{Destroy, Drift, Health, Publish, Rollout, Stack};

const PUBLISH: &[Scope] = &[Publish];
const ROLLOUT: &[Scope] = &[Rollout];
const STACK: &[Scope] = &[Stack];
/// The commands that run commands on instances through SSM.
const RUN_COMMAND: &[Scope] = &[Rollout, Health, Drift];
/// Everything that lists instances: fleets, `image gc`'s in-use check, and `stack
/// delete`'s check that no fleet still runs in the VPC.
const LIST_INSTANCES: &[Scope] = &[Publish, Rollout, Health, Drift, Destroy, Stack];

/// Instance ARNs (any instance: the conditions pick the fleet's).
const INSTANCES: &str = "arn:{partition}:ec2:{region}:{account}:instance/*";
const VOLUMES: &str = "arn:{partition}:ec2:{region}:{account}:volume/*";
/// AMIs and snapshots: their ARNs carry no account.
const IMAGES: &str = "arn:{partition}:ec2:{region}::image/*";
const SNAPSHOTS: &str = "arn:{partition}:ec2:{region}::snapshot/*";
const IMPORT_TASKS: &str = "arn:{partition}:ec2:{region}:{account}:import-snapshot-task/*";
/// The stack's import bucket (`${Prefix}import-${AWS::AccountId}-${AWS::Region}` in
/// `stack.yaml`), also `image publish --via s3`'s staging bucket. `{prefix}*` like the
/// stacks, roles and target groups: one policy for `amictl-pr-` covers every stack
/// prefixed `amictl-pr-N-`.
const IMPORT_BUCKET: &str = "arn:{partition}:s3:::{prefix}*import-{account}-{region}";
const IMPORT_OBJECTS: &str = "arn:{partition}:s3:::{prefix}*import-{account}-{region}/*";
/// The fleets' locks in that bucket ([`crate::lock::s3::KEY_PREFIX`]).
const FLEET_LOCKS: &str = "arn:{partition}:s3:::{prefix}*import-{account}-{region}/amictl/locks/*";
/// The stack's access log bucket (`${Prefix}logs-${AWS::AccountId}-${AWS::Region}`): the
/// load balancer's log delivery writes to it, not the caller.
const LOG_BUCKET: &str = "arn:{partition}:s3:::{prefix}*logs-{account}-{region}";
const PREFIX_ROLES: &str = "arn:{partition}:iam::{account}:role/{prefix}*";
/// The stack's network resources. EC2 ARNs carry ids, not names: the prefix narrows them
/// through the `amictl:prefix` tag the template puts on each.
const VPCS: &str = "arn:{partition}:ec2:{region}:{account}:vpc/*";
const SUBNETS: &str = "arn:{partition}:ec2:{region}:{account}:subnet/*";
const ROUTE_TABLES: &str = "arn:{partition}:ec2:{region}:{account}:route-table/*";
const INTERNET_GATEWAYS: &str = "arn:{partition}:ec2:{region}:{account}:internet-gateway/*";
const SECURITY_GROUPS: &str = "arn:{partition}:ec2:{region}:{account}:security-group/*";
const NETWORK: &[&str] = &[
    INTERNET_GATEWAYS,
    ROUTE_TABLES,
    SECURITY_GROUPS,
    SUBNETS,
    VPCS,
];
/// The create calls of the network resources the template tags (the values of
/// `ec2:CreateAction` when they tag what they create).
const NETWORK_CREATE_ACTIONS: &[&str] = &[
    "CreateInternetGateway",
    "CreateRouteTable",
    "CreateSecurityGroup",
    "CreateSubnet",
    "CreateVpc",
];
const PREFIX_ALARMS: &str = "arn:{partition}:cloudwatch:{region}:{account}:alarm:{prefix}*";
const PREFIX_TARGET_GROUPS: &str =
    "arn:{partition}:elasticloadbalancing:{region}:{account}:targetgroup/{prefix}*/*";
/// The fleets' Auto Scaling groups, `{prefix}{fleet}-{az}-{rollout}`
/// ([`crate::rollout::groups::group_name`]); the ARN's group id is not known in advance.
const PREFIX_GROUPS: &str =
    "arn:{partition}:autoscaling:{region}:{account}:autoScalingGroup:*:autoScalingGroupName/{prefix}*";
/// Their launch templates (one per group, named like it): EC2 ARNs carry ids, so the
/// `amictl:prefix` tag narrows them.
const LAUNCH_TEMPLATES: &str = "arn:{partition}:ec2:{region}:{account}:launch-template/*";
/// A group of the prefix, by the `amictl:prefix` tag it was made with.
const PREFIX_GROUP: Condition = (
    "StringLike",
    "autoscaling:ResourceTag/amictl:prefix",
    &["{prefix}*"],
);

/// Only instances of the prefix's fleets: a fleet's name starts with the prefix (as the
/// stack's does, `amictl up` names the fleet after it), so a policy for `amictl-pr-` cannot
/// reach `amictl-main`'s instances.
const FLEET_INSTANCE: Condition = ("StringLike", "aws:ResourceTag/amictl:fleet", &["{prefix}*"]);
/// What amictl made for the prefix: `image publish` tags images and snapshots
/// `amictl:prefix` as it creates them, and the stack template its network resources.
const PREFIX_TAGGED: Condition = (
    "StringLike",
    "aws:ResourceTag/amictl:prefix",
    &["{prefix}*"],
);
/// A create request that tags what it creates with the prefix.
const PREFIX_REQUEST_TAG: Condition =
    ("StringLike", "aws:RequestTag/amictl:prefix", &["{prefix}*"]);
/// Only amictl's own tag keys (and Name) on images and snapshots.
const AMICTL_TAG_KEYS: Condition = (
    "ForAllValues:StringLike",
    "aws:TagKeys",
    &["Name", "amictl:*"],
);

/// Every capability amictl has, in the order the policy lists them.
pub const GRANTS: &[Grant] = &[
    // ---- read-only --------------------------------------------------------------------
    // EC2's and ELB's Describe calls support no resource-level permissions: "*" is the
    // only resource they take.
    Grant {
        sid: "DescribeReadOnly",
        actions: &[
            (&[Publish, Rollout], "ec2:DescribeImages"),
            (LIST_INSTANCES, "ec2:DescribeInstances"),
            (PUBLISH, "ec2:DescribeSnapshots"),
            (PUBLISH, "ec2:DescribeImportSnapshotTasks"),
            // `--omit-zero-blocks` is refused where new volumes are encrypted by default.
            (PUBLISH, "ec2:GetEbsEncryptionByDefault"),
            (&[Rollout, Stack], "ec2:DescribeSubnets"),
            // Auto Scaling's Describe calls take no resource either.
            (&[Rollout, Destroy], "autoscaling:DescribeAutoScalingGroups"),
            (
                &[Rollout, Stack],
                "elasticloadbalancing:DescribeLoadBalancers",
            ),
            (&[Rollout, Stack], "elasticloadbalancing:DescribeTargetGroups"),
            (ROLLOUT, "elasticloadbalancing:DescribeTargetHealth"),
            // What CloudFormation's handlers read while they create, update and delete
            // the stack's resources (`Fn::GetAZs` reads the availability zones).
            (STACK, "ec2:DescribeAccountAttributes"),
            (STACK, "ec2:DescribeAvailabilityZones"),
            (STACK, "ec2:DescribeInternetGateways"),
            (STACK, "ec2:DescribeIpamPools"),
            (STACK, "ec2:DescribeNetworkAcls"),
            (STACK, "ec2:DescribeNetworkInterfaces"),
            (STACK, "ec2:DescribeRouteTables"),
            (STACK, "ec2:DescribeSecurityGroupRules"),
            (STACK, "ec2:DescribeSecurityGroups"),
            (STACK, "ec2:DescribeVpcEncryptionControls"),
            (STACK, "ec2:DescribeVpcs"),
            (STACK, "elasticloadbalancing:DescribeCapacityReservation"),
            (STACK, "elasticloadbalancing:DescribeListenerAttributes"),
            (STACK, "elasticloadbalancing:DescribeListeners"),
            (STACK, "elasticloadbalancing:DescribeLoadBalancerAttributes"),
            (STACK, "elasticloadbalancing:DescribeTags"),
            (STACK, "elasticloadbalancing:DescribeTargetGroupAttributes"),
        ],
        resources: &["*"],
        conditions: &[],
    },
    // ---- publish: the snapshot ---------------------------------------------------------
    Grant {
        sid: "EbsDirectUpload",
        // An encrypted upload with the account's default key (aws/ebs) needs nothing more;
        // with a customer managed key (--kms-key-id) the key's policy must let the caller
        // use it (kms:GenerateDataKeyWithoutPlaintext, kms:CreateGrant, kms:Decrypt,
        // kms:DescribeKey): not granted here, the key is not amictl's.
        // The snapshot is tagged with the prefix as it starts; its blocks only go to one.
        actions: &[(PUBLISH, "ebs:StartSnapshot")],
        resources: &[SNAPSHOTS],
        conditions: &[PREFIX_REQUEST_TAG],
    },
    Grant {
        sid: "EbsDirectUploadBlocks",
        actions: &[
            (PUBLISH, "ebs:PutSnapshotBlock"),
            (PUBLISH, "ebs:CompleteSnapshot"),
        ],
        resources: &[SNAPSHOTS],
        conditions: &[PREFIX_TAGGED],
    },
    Grant {
        sid: "ImportStagingObjects",
        // The stack's import bucket (`image publish --via s3 --bucket` of the stack's
        // ImportBucket output); another bucket needs its own grant.
        actions: &[
            (PUBLISH, "s3:PutObject"),
            (PUBLISH, "s3:AbortMultipartUpload"),
            (PUBLISH, "s3:DeleteObject"),
            // VM Import/Export's documented user permissions include reading the object it
            // imports (the import itself reads it as the vmimport role).
            (PUBLISH, "s3:GetObject"),
        ],
        resources: &[IMPORT_OBJECTS],
        conditions: &[],
    },
    Grant {
        sid: "FleetLock",
        // The fleet's lease (`lock/s3.rs`) in the stack's bucket, under its own key prefix:
        // conditional PutObject to take and renew it, conditional DeleteObject to release
        // it, which S3 authorizes only with s3:GetObject as well.
        actions: &[
            (&[Rollout, Destroy], "s3:DeleteObject"),
            (&[Rollout, Destroy], "s3:GetObject"),
            (&[Rollout, Destroy], "s3:PutObject"),
        ],
        resources: &[FLEET_LOCKS],
        conditions: &[],
    },
    Grant {
        sid: "ImportStagingBucket",
        // VM Import/Export's documented user permissions on the import bucket. ListBucket
        // also for the fleet's lock: without it S3 answers a GetObject of a missing key (a
        // lease released between two calls) with 403 AccessDenied instead of 404
        // NoSuchKey, and a released lease would read as a denied one.
        actions: &[
            (PUBLISH, "s3:GetBucketLocation"),
            (&[Publish, Rollout, Destroy], "s3:ListBucket"),
        ],
        resources: &[IMPORT_BUCKET],
        conditions: &[],
    },
    Grant {
        sid: "ImportSnapshot",
        // The import task and the snapshot it makes (the Service Authorization Reference's
        // resource types for both actions).
        actions: &[
            (PUBLISH, "ec2:ImportSnapshot"),
            (PUBLISH, "ec2:CancelImportTask"),
        ],
        resources: &[IMPORT_TASKS, SNAPSHOTS],
        conditions: &[],
    },
    Grant {
        sid: "TagImportTasksOnCreate",
        // ImportSnapshot tags its task as it creates it, and nothing else.
        actions: &[(PUBLISH, "ec2:CreateTags")],
        resources: &[IMPORT_TASKS],
        conditions: &[("StringEquals", "ec2:CreateAction", &["ImportSnapshot"])],
    },
    Grant {
        sid: "PassVmImportRole",
        // VM Import/Export reads the staging object as the `vmimport` service role. Not
        // every account checks that the caller may pass it; granting it is harmless (the
        // role trusts only vmie.amazonaws.com) and keeps `--via s3` working where it does.
        actions: &[(PUBLISH, "iam:PassRole")],
        resources: &["arn:{partition}:iam::{account}:role/vmimport"],
        conditions: &[],
    },
    // ---- publish: the AMI --------------------------------------------------------------
    Grant {
        sid: "RegisterImages",
        // CopyImage runs in the copy's region (`--copy-to-regions`): pass each region with
        // --region, or none for all.
        actions: &[
            (PUBLISH, "ec2:RegisterImage"),
            (PUBLISH, "ec2:CopyImage"),
        ],
        resources: &[IMAGES, SNAPSHOTS],
        conditions: &[],
    },
    Grant {
        sid: "TagImagesOnCreate",
        // RegisterImage and CopyImage tag what they create: with the prefix, amictl's keys.
        actions: &[(PUBLISH, "ec2:CreateTags")],
        resources: &[IMAGES, SNAPSHOTS],
        conditions: &[
            (
                "StringEquals",
                "ec2:CreateAction",
                &["RegisterImage", "CopyImage"],
            ),
            PREFIX_REQUEST_TAG,
            AMICTL_TAG_KEYS,
        ],
    },
    Grant {
        sid: "TagOwnImages",
        // Later tags (the snapshot once registered, a copy's snapshots) only on what the
        // prefix already owns, and never handing it to another prefix. Without a
        // CreateAction condition anywhere, amictl:managed-by could be put on any AMI and
        // the next statements would then reach it.
        actions: &[(PUBLISH, "ec2:CreateTags")],
        resources: &[IMAGES, SNAPSHOTS],
        conditions: &[
            PREFIX_TAGGED,
            (
                "StringLikeIfExists",
                "aws:RequestTag/amictl:prefix",
                &["{prefix}*"],
            ),
            AMICTL_TAG_KEYS,
        ],
    },
    Grant {
        sid: "ClaimImportedSnapshots",
        // ImportSnapshot (`--via s3`) tags only its task: the snapshot it makes has no
        // tags, so `publish` claims it for the prefix as soon as the import completes, and
        // only a snapshot no prefix has claimed can be claimed. This is also what
        // StartSnapshot's tags need: the Service Authorization Reference lists
        // ec2:CreateTags as a dependent action of ebs:StartSnapshot, on a snapshot that has
        // no tags yet (whether EBS sets ec2:CreateAction there is not documented, so this
        // statement does not test it).
        actions: &[(PUBLISH, "ec2:CreateTags")],
        resources: &[SNAPSHOTS],
        conditions: &[
            ("Null", "aws:ResourceTag/amictl:prefix", &["true"]),
            PREFIX_REQUEST_TAG,
            AMICTL_TAG_KEYS,
        ],
    },
    Grant {
        sid: "ManageOwnImages",
        // Every AMI amictl makes is tagged amictl:managed-by=amictl on creation (the tags
        // are part of RegisterImage and CopyImage), so gc, deprecation and public launch
        // permission can be limited to those.
        actions: &[
            (PUBLISH, "ec2:DeregisterImage"),
            (PUBLISH, "ec2:EnableImageDeprecation"),
            (PUBLISH, "ec2:ModifyImageAttribute"),
        ],
        resources: &[IMAGES],
        conditions: &[
            (
                "StringEquals",
                "aws:ResourceTag/amictl:managed-by",
                &["amictl"],
            ),
            PREFIX_TAGGED,
        ],
    },
    Grant {
        sid: "DeleteSnapshots",
        // Only the prefix's snapshots: an upload's carries the prefix from its start, and
        // an import's is claimed before anything else can fail (ClaimImportedSnapshots).
        actions: &[(PUBLISH, "ec2:DeleteSnapshot")],
        resources: &[SNAPSHOTS],
        conditions: &[PREFIX_TAGGED],
    },
    // ---- rollout: instances ------------------------------------------------------------
    Grant {
        sid: "LaunchInstances",
        // What RunInstances is authorized against besides the instance and its volume
        // (next statement): the image, the subnet, the security groups, the network
        // interface it creates.
        actions: &[(ROLLOUT, "ec2:RunInstances")],
        resources: &[
            IMAGES,
            "arn:{partition}:ec2:{region}:{account}:network-interface/*",
        ],
        conditions: &[],
    },
    Grant {
        sid: "LaunchIntoNetwork",
        // The subnet and security groups a fleet launches into: a stack's of this prefix,
        // or a network of the operator's own without amictl's tag (a rollout without a
        // stack), never a stack's of another prefix.
        actions: &[(ROLLOUT, "ec2:RunInstances")],
        resources: &[
            "arn:{partition}:ec2:{region}:{account}:security-group/*",
            "arn:{partition}:ec2:{region}:{account}:subnet/*",
        ],
        conditions: &[(
            "StringLikeIfExists",
            "aws:ResourceTag/amictl:prefix",
            &["{prefix}*"],
        )],
    },
    Grant {
        sid: "LaunchFleetInstances",
        // Only instances (and volumes) tagged with their fleet as they launch. The root
        // volume is encrypted with the account's default EBS key; a customer managed
        // default key needs its key policy to allow the caller.
        actions: &[(ROLLOUT, "ec2:RunInstances")],
        resources: &[INSTANCES, VOLUMES],
        conditions: &[("StringLike", "aws:RequestTag/amictl:fleet", &["{prefix}*"])],
    },
    Grant {
        sid: "TagFleetInstancesOnLaunch",
        actions: &[(ROLLOUT, "ec2:CreateTags")],
        resources: &[INSTANCES, VOLUMES],
        conditions: &[
            ("StringEquals", "ec2:CreateAction", &["RunInstances"]),
            ("StringLike", "aws:RequestTag/amictl:fleet", &["{prefix}*"]),
        ],
    },
    Grant {
        sid: "PassFleetInstanceRole",
        // The instance profile's role (the stack's `${Prefix}instance`), to EC2 only.
        actions: &[(ROLLOUT, "iam:PassRole")],
        resources: &[PREFIX_ROLES],
        conditions: &[("StringEquals", "iam:PassedToService", &["ec2.{amazonaws}"])],
    },
    Grant {
        sid: "RetireFleetInstances",
        // The amictl:retiring mark on a fleet's instances, and nothing else.
        actions: &[(ROLLOUT, "ec2:CreateTags"), (ROLLOUT, "ec2:DeleteTags")],
        resources: &[INSTANCES],
        conditions: &[
            FLEET_INSTANCE,
            (
                "ForAllValues:StringEquals",
                "aws:TagKeys",
                &["amictl:retiring"],
            ),
        ],
    },
    Grant {
        sid: "TerminateFleetInstances",
        actions: &[(&[Rollout, Destroy], "ec2:TerminateInstances")],
        resources: &[INSTANCES],
        conditions: &[FLEET_INSTANCE],
    },
    // ---- rollout: Auto Scaling groups -------------------------------------------------
    Grant {
        sid: "FleetLaunchTemplates",
        // One launch template per group, named like it, tagged with the prefix as it is
        // made (the tags go on with it: ec2:CreateTags, next statement).
        actions: &[(ROLLOUT, "ec2:CreateLaunchTemplate")],
        resources: &[LAUNCH_TEMPLATES],
        conditions: &[PREFIX_REQUEST_TAG],
    },
    Grant {
        sid: "TagLaunchTemplatesOnCreate",
        actions: &[(ROLLOUT, "ec2:CreateTags")],
        resources: &[LAUNCH_TEMPLATES],
        conditions: &[
            ("StringEquals", "ec2:CreateAction", &["CreateLaunchTemplate"]),
            PREFIX_REQUEST_TAG,
        ],
    },
    Grant {
        sid: "LaunchFromFleetTemplates",
        // CreateAutoScalingGroup checks that the caller may run instances from the launch
        // template it names; the group then launches as its service-linked role.
        actions: &[(ROLLOUT, "ec2:RunInstances")],
        resources: &[LAUNCH_TEMPLATES],
        conditions: &[PREFIX_TAGGED],
    },
    Grant {
        sid: "DeleteFleetLaunchTemplates",
        actions: &[(&[Rollout, Destroy], "ec2:DeleteLaunchTemplate")],
        resources: &[LAUNCH_TEMPLATES],
        conditions: &[PREFIX_TAGGED],
    },
    Grant {
        sid: "CreateFleetGroups",
        // Named with the prefix and tagged with it as it is made.
        actions: &[(ROLLOUT, "autoscaling:CreateAutoScalingGroup")],
        resources: &[PREFIX_GROUPS],
        conditions: &[PREFIX_REQUEST_TAG],
    },
    Grant {
        sid: "ChangeFleetGroups",
        // Attach and detach (the stack's target group, or a --target-group's), hold
        // (suspend, resume), resize, scale on requests, delete: only a group of the prefix.
        actions: &[
            (ROLLOUT, "autoscaling:AttachLoadBalancerTargetGroups"),
            (ROLLOUT, "autoscaling:DetachLoadBalancerTargetGroups"),
            (ROLLOUT, "autoscaling:SuspendProcesses"),
            (ROLLOUT, "autoscaling:ResumeProcesses"),
            (ROLLOUT, "autoscaling:UpdateAutoScalingGroup"),
            (ROLLOUT, "autoscaling:PutScalingPolicy"),
            (ROLLOUT, "autoscaling:DeletePolicy"),
            (&[Rollout, Destroy], "autoscaling:DeleteAutoScalingGroup"),
        ],
        resources: &[PREFIX_GROUPS],
        conditions: &[PREFIX_GROUP],
    },
    Grant {
        sid: "RetireFleetGroups",
        // The amictl:retiring mark on a group of the prefix, and nothing else.
        actions: &[
            (ROLLOUT, "autoscaling:CreateOrUpdateTags"),
            (ROLLOUT, "autoscaling:DeleteTags"),
        ],
        resources: &[PREFIX_GROUPS],
        conditions: &[
            PREFIX_GROUP,
            (
                "ForAllValues:StringEquals",
                "aws:TagKeys",
                &["amictl:retiring"],
            ),
        ],
    },
    Grant {
        sid: "CreateAutoScalingServiceLinkedRole",
        // An account's first Auto Scaling group creates AWSServiceRoleForAutoScaling.
        actions: &[(ROLLOUT, "iam:CreateServiceLinkedRole")],
        resources: &[
            "arn:{partition}:iam::{account}:role/aws-service-role/autoscaling.{amazonaws}/AWSServiceRoleForAutoScaling",
        ],
        conditions: &[(
            "StringEquals",
            "iam:AWSServiceName",
            &["autoscaling.{amazonaws}"],
        )],
    },
    // ---- rollout: traffic and alarms ---------------------------------------------------
    Grant {
        sid: "ShiftTargetGroupTraffic",
        // The stack's target group is `${Prefix}tg`; a --target-group of another name needs
        // its own grant.
        actions: &[
            (ROLLOUT, "elasticloadbalancing:RegisterTargets"),
            (ROLLOUT, "elasticloadbalancing:DeregisterTargets"),
        ],
        resources: &[PREFIX_TARGET_GROUPS],
        conditions: &[],
    },
    Grant {
        sid: "ReadAlarms",
        // DescribeAlarms takes alarm ARNs (a narrower grant only hides composite alarms,
        // which amictl does not use); the stack's alarms are `${Prefix}...`.
        actions: &[(&[Rollout, Stack], "cloudwatch:DescribeAlarms")],
        resources: &[PREFIX_ALARMS],
        conditions: &[],
    },
    // ---- SSM Run Command (rollout health gates, health, drift) -------------------------
    // amictl sends only its own documents, one fixed command each: a grant on a document is
    // a grant of that command alone, where AWS-RunShellScript would be a root shell on
    // every fleet instance. Each scope gets the documents its commands send.
    Grant {
        sid: "RunHealthCheckDocument",
        actions: &[(RUN_COMMAND, "ssm:SendCommand")],
        resources: &[HEALTH_CHECK_DOCUMENT],
        conditions: &[],
    },
    Grant {
        sid: "RunDriftReportDocument",
        actions: &[(&[Drift], "ssm:SendCommand")],
        resources: &[DRIFT_REPORT_DOCUMENT],
        conditions: &[],
    },
    Grant {
        sid: "RunRestartAgentDocument",
        // `health --heal`.
        actions: &[(&[Health], "ssm:SendCommand")],
        resources: &[RESTART_AGENT_DOCUMENT],
        conditions: &[],
    },
    Grant {
        sid: "AmictlDocuments",
        // Each command reads a document before it sends it (is it amictl's?). Only rollout
        // and the stack write them: whoever may both write a document and send it may run
        // anything as root, which rollout can already on the instances it launches (user
        // data), and health and drift must not.
        actions: &[
            (&[Rollout, Health, Drift, Stack], "ssm:GetDocument"),
            (&[Rollout, Stack], "ssm:CreateDocument"),
            (&[Rollout, Stack], "ssm:UpdateDocument"),
            (&[Rollout, Stack], "ssm:UpdateDocumentDefaultVersion"),
            // The rest of what CloudFormation's AWS::SSM::Document handlers call (the
            // stack's tags go on every resource that takes tags).
            (STACK, "ssm:AddTagsToResource"),
            (STACK, "ssm:DeleteDocument"),
            (STACK, "ssm:DescribeDocument"),
            (STACK, "ssm:ListTagsForResource"),
            (STACK, "ssm:RemoveTagsFromResource"),
        ],
        resources: AMICTL_DOCUMENTS,
        conditions: &[],
    },
    Grant {
        sid: "RunCommandOnFleetInstances",
        // SendCommand is authorized against the document (above) and each instance: here
        // only instances of the prefix's fleets. A separate statement, since the document
        // has no tags.
        actions: &[(RUN_COMMAND, "ssm:SendCommand")],
        resources: &[INSTANCES],
        conditions: &[("StringLike", "ssm:resourceTag/amictl:fleet", &["{prefix}*"])],
    },
    Grant {
        sid: "RunCommandResults",
        // No resource-level permissions: the command id is the only handle.
        actions: &[
            (RUN_COMMAND, "ssm:GetCommandInvocation"),
            (RUN_COMMAND, "ssm:CancelCommand"),
        ],
        resources: &["*"],
        conditions: &[],
    },
    // ---- stack: CloudFormation itself --------------------------------------------------
    Grant {
        sid: "CloudFormationStacks",
        // Stacks named with the prefix (`stack deploy --name PREFIX...`). Change set calls
        // are authorized against the stack too, so no change set ARN is needed.
        actions: &[
            (STACK, "cloudformation:CreateChangeSet"),
            (STACK, "cloudformation:DeleteChangeSet"),
            (STACK, "cloudformation:DeleteStack"),
            (STACK, "cloudformation:DescribeChangeSet"),
            (STACK, "cloudformation:DescribeStackEvents"),
            // `rollout --stack` and `destroy --stack` read the outputs (the lock's bucket).
            (&[Rollout, Destroy, Stack], "cloudformation:DescribeStacks"),
            (STACK, "cloudformation:ExecuteChangeSet"),
        ],
        resources: &["arn:{partition}:cloudformation:{region}:{account}:stack/{prefix}*/*"],
        conditions: &[],
    },
    // ---- stack: what CloudFormation does with the caller's permissions -----------------
    // The VPC, subnets, internet gateway, route table and security groups, bound to the
    // prefix by their `amictl:prefix` tag: created only tagged with it (CloudFormation's
    // handlers for these five types pass the template's tags to the create call: their
    // registry schemas say tagOnCreate), changed and deleted only while they carry it. What
    // has no tags (routes, subnet associations, the gateway's attachment, security group
    // rules) is authorized against the tagged resources it belongs to.
    Grant {
        sid: "StackCreateVpc",
        // A statement of its own: CreateSubnet, CreateRouteTable and CreateSecurityGroup
        // are also authorized against their VPC, which must carry the prefix
        // (StackNetwork), not merely be named in a request that carries it.
        actions: &[(STACK, "ec2:CreateVpc")],
        resources: &[VPCS],
        conditions: &[PREFIX_REQUEST_TAG],
    },
    Grant {
        sid: "StackCreateNetwork",
        actions: &[
            (STACK, "ec2:CreateInternetGateway"),
            (STACK, "ec2:CreateRouteTable"),
            (STACK, "ec2:CreateSecurityGroup"),
            (STACK, "ec2:CreateSubnet"),
        ],
        resources: &[INTERNET_GATEWAYS, ROUTE_TABLES, SECURITY_GROUPS, SUBNETS],
        conditions: &[PREFIX_REQUEST_TAG],
    },
    Grant {
        sid: "StackTagNetworkOnCreate",
        // The create calls above tag what they create, and nothing else.
        actions: &[(STACK, "ec2:CreateTags")],
        resources: NETWORK,
        conditions: &[
            ("StringEquals", "ec2:CreateAction", NETWORK_CREATE_ACTIONS),
            PREFIX_REQUEST_TAG,
        ],
    },
    Grant {
        sid: "StackNetwork",
        // The prefix's network: its VPC (also as the parent of a new subnet, route table or
        // security group), subnets, route tables with their routes and associations,
        // gateway and its attachment, security groups and their rules.
        actions: &[
            (STACK, "ec2:AssociateRouteTable"),
            (STACK, "ec2:AttachInternetGateway"),
            (STACK, "ec2:AuthorizeSecurityGroupEgress"),
            (STACK, "ec2:AuthorizeSecurityGroupIngress"),
            (STACK, "ec2:CreateRoute"),
            (STACK, "ec2:CreateRouteTable"),
            (STACK, "ec2:CreateSecurityGroup"),
            (STACK, "ec2:CreateSubnet"),
            (STACK, "ec2:DeleteInternetGateway"),
            (STACK, "ec2:DeleteRoute"),
            (STACK, "ec2:DeleteRouteTable"),
            (STACK, "ec2:DeleteSecurityGroup"),
            (STACK, "ec2:DeleteSubnet"),
            (STACK, "ec2:DeleteVpc"),
            (STACK, "ec2:DescribeVpcAttribute"),
            (STACK, "ec2:DetachInternetGateway"),
            (STACK, "ec2:DisassociateRouteTable"),
            (STACK, "ec2:ModifySubnetAttribute"),
            (STACK, "ec2:ModifyVpcAttribute"),
            (STACK, "ec2:ReplaceRoute"),
            (STACK, "ec2:ReplaceRouteTableAssociation"),
            (STACK, "ec2:RevokeSecurityGroupEgress"),
            (STACK, "ec2:RevokeSecurityGroupIngress"),
            (STACK, "ec2:UpdateSecurityGroupRuleDescriptionsEgress"),
            (STACK, "ec2:UpdateSecurityGroupRuleDescriptionsIngress"),
        ],
        resources: NETWORK,
        conditions: &[PREFIX_TAGGED],
    },
    Grant {
        sid: "StackRetagNetwork",
        // A stack update's tag changes, on the prefix's network only, and never handing a
        // resource to another prefix. Nothing claims an untagged one: a stack deployed
        // before the template tagged its network needs that tag put on once by someone
        // else (docs/design.md).
        actions: &[(STACK, "ec2:CreateTags"), (STACK, "ec2:DeleteTags")],
        resources: NETWORK,
        conditions: &[
            PREFIX_TAGGED,
            (
                "StringLikeIfExists",
                "aws:RequestTag/amictl:prefix",
                &["{prefix}*"],
            ),
        ],
    },
    Grant {
        sid: "StackSecurityGroupRules",
        // A new rule is authorized as a resource of its own besides its group; CloudFormation
        // does not tag rules (AWS::EC2::SecurityGroupIngress takes no tags), so the rule
        // cannot carry the prefix. Its group must (StackNetwork), and every call here also
        // needs the group.
        actions: &[
            (STACK, "ec2:AuthorizeSecurityGroupEgress"),
            (STACK, "ec2:AuthorizeSecurityGroupIngress"),
        ],
        resources: &["arn:{partition}:ec2:{region}:{account}:security-group-rule/*"],
        conditions: &[],
    },
    Grant {
        sid: "StackLoadBalancer",
        // `${Prefix}alb`, its listener, and `${Prefix}tg`, with their tags.
        actions: &[
            (STACK, "elasticloadbalancing:AddTags"),
            (STACK, "elasticloadbalancing:CreateListener"),
            (STACK, "elasticloadbalancing:CreateLoadBalancer"),
            (STACK, "elasticloadbalancing:CreateTargetGroup"),
            (STACK, "elasticloadbalancing:DeleteListener"),
            (STACK, "elasticloadbalancing:DeleteLoadBalancer"),
            (STACK, "elasticloadbalancing:DeleteTargetGroup"),
            (STACK, "elasticloadbalancing:ModifyListener"),
            (STACK, "elasticloadbalancing:ModifyListenerAttributes"),
            (STACK, "elasticloadbalancing:ModifyLoadBalancerAttributes"),
            (STACK, "elasticloadbalancing:ModifyTargetGroup"),
            (STACK, "elasticloadbalancing:ModifyTargetGroupAttributes"),
            (STACK, "elasticloadbalancing:RemoveTags"),
            (STACK, "elasticloadbalancing:SetIpAddressType"),
            (STACK, "elasticloadbalancing:SetSecurityGroups"),
            (STACK, "elasticloadbalancing:SetSubnets"),
        ],
        resources: &[
            "arn:{partition}:elasticloadbalancing:{region}:{account}:listener/app/{prefix}*/*/*",
            "arn:{partition}:elasticloadbalancing:{region}:{account}:loadbalancer/app/{prefix}*/*",
            PREFIX_TARGET_GROUPS,
        ],
        conditions: &[],
    },
    Grant {
        sid: "CreateElbServiceLinkedRole",
        // The first load balancer in an account creates ELB's service-linked role.
        actions: &[(STACK, "iam:CreateServiceLinkedRole")],
        resources: &[
            "arn:{partition}:iam::{account}:role/aws-service-role/elasticloadbalancing.{amazonaws}/AWSServiceRoleForElasticLoadBalancing",
        ],
        conditions: &[(
            "StringEquals",
            "iam:AWSServiceName",
            &["elasticloadbalancing.{amazonaws}"],
        )],
    },
    Grant {
        sid: "StackInstanceRole",
        // `${Prefix}instance`, the role and its instance profile. No inline policies
        // (iam:PutRolePolicy): the template has none, and the role must not get more than
        // the one managed policy (StackInstanceRolePolicy). PassRole has its own statement.
        actions: &[
            (STACK, "iam:AddRoleToInstanceProfile"),
            (STACK, "iam:CreateInstanceProfile"),
            (STACK, "iam:CreateRole"),
            (STACK, "iam:DeleteInstanceProfile"),
            (STACK, "iam:DeleteRole"),
            (STACK, "iam:GetInstanceProfile"),
            (STACK, "iam:GetRole"),
            (STACK, "iam:GetRolePolicy"),
            (STACK, "iam:ListAttachedRolePolicies"),
            (STACK, "iam:ListInstanceProfilesForRole"),
            (STACK, "iam:ListRolePolicies"),
            (STACK, "iam:RemoveRoleFromInstanceProfile"),
            (STACK, "iam:TagInstanceProfile"),
            (STACK, "iam:TagRole"),
            (STACK, "iam:UntagInstanceProfile"),
            (STACK, "iam:UntagRole"),
            (STACK, "iam:UpdateAssumeRolePolicy"),
            (STACK, "iam:UpdateRole"),
            (STACK, "iam:UpdateRoleDescription"),
        ],
        resources: &[
            "arn:{partition}:iam::{account}:instance-profile/{prefix}*",
            PREFIX_ROLES,
        ],
        conditions: &[],
    },
    Grant {
        sid: "StackPassInstanceRole",
        // What AddRoleToInstanceProfile needs. Whether that check carries
        // iam:PassedToService is not documented, hence IfExists: wherever a service is
        // named, it must be EC2 (the role trusts only EC2 anyway).
        actions: &[(STACK, "iam:PassRole")],
        resources: &[PREFIX_ROLES],
        conditions: &[(
            "StringEqualsIfExists",
            "iam:PassedToService",
            &["ec2.{amazonaws}"],
        )],
    },
    Grant {
        sid: "StackInstanceRolePolicy",
        actions: &[
            (STACK, "iam:AttachRolePolicy"),
            (STACK, "iam:DetachRolePolicy"),
        ],
        resources: &[PREFIX_ROLES],
        conditions: &[(
            "ArnEquals",
            "iam:PolicyARN",
            &["arn:{partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"],
        )],
    },
    Grant {
        sid: "StackAlarms",
        actions: &[
            (STACK, "cloudwatch:DeleteAlarms"),
            (STACK, "cloudwatch:ListTagsForResource"),
            (STACK, "cloudwatch:PutMetricAlarm"),
            (STACK, "cloudwatch:TagResource"),
            (STACK, "cloudwatch:UntagResource"),
        ],
        resources: &[PREFIX_ALARMS],
        conditions: &[],
    },
    Grant {
        sid: "StackBuckets",
        // The import and access log buckets with their encryption, public access block,
        // ownership controls, lifecycle rules, tags and policy, as the template sets them.
        actions: &[
            (STACK, "s3:CreateBucket"),
            (STACK, "s3:DeleteBucket"),
            (STACK, "s3:DeleteBucketPolicy"),
            (STACK, "s3:GetBucketOwnershipControls"),
            (STACK, "s3:GetBucketPolicy"),
            (STACK, "s3:GetBucketPublicAccessBlock"),
            (STACK, "s3:GetBucketTagging"),
            (STACK, "s3:GetEncryptionConfiguration"),
            (STACK, "s3:GetLifecycleConfiguration"),
            (STACK, "s3:ListBucket"),
            (STACK, "s3:PutBucketOwnershipControls"),
            (STACK, "s3:PutBucketPolicy"),
            (STACK, "s3:PutBucketPublicAccessBlock"),
            (STACK, "s3:PutBucketTagging"),
            (STACK, "s3:PutEncryptionConfiguration"),
            (STACK, "s3:PutLifecycleConfiguration"),
        ],
        resources: &[IMPORT_BUCKET, LOG_BUCKET],
        conditions: &[],
    },
];

/// Actions that take no resource-level permissions besides Describe calls (or whose
/// documentation is unclear, see their grants): the only others allowed in a statement on
/// `"*"` without a condition.
pub const UNSCOPED_ACTIONS: &[&str] = &[
    // An account-wide setting, read-only: it has no resource.
    "ec2:GetEbsEncryptionByDefault",
    "ssm:CancelCommand",
    "ssm:GetCommandInvocation",
];

/// Where the policy applies: the ARNs' partition, account, regions and name prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    partition: String,
    account: Option<String>,
    regions: Vec<String>,
    prefix: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("partition {0:?} is not an AWS partition (aws, aws-cn, aws-us-gov, ...)")]
    Partition(String),
    #[error("account {0:?} is not an AWS account id (12 digits)")]
    Account(String),
    #[error("region {0:?} is not an AWS region name (e.g. us-east-1)")]
    Region(String),
    #[error("prefix {0:?} cannot go into an ARN: it must be 1 to 64 letters, digits, '-', '_' or '.' (e.g. amictl-)")]
    Prefix(String),
}

impl Target {
    /// Checks every part before it goes into an ARN: a stray `*` or `:` would widen or
    /// break the policy.
    pub fn new(
        partition: &str,
        account: Option<&str>,
        regions: &[String],
        prefix: &str,
    ) -> Result<Target, TargetError> {
        let lower_words = |s: &str| {
            s.split('-').all(|w| {
                !w.is_empty()
                    && w.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
            })
        };
        if !(partition == "aws" || partition.starts_with("aws-")) || !lower_words(partition) {
            return Err(TargetError::Partition(partition.to_owned()));
        }
        if let Some(a) = account {
            if a.len() != 12 || !a.chars().all(|c| c.is_ascii_digit()) {
                return Err(TargetError::Account(a.to_owned()));
            }
        }
        for r in regions {
            let ends_in_digit = r.chars().last().is_some_and(|c| c.is_ascii_digit());
            if r.len() > 32 || r.split('-').count() < 3 || !ends_in_digit || !lower_words(r) {
                return Err(TargetError::Region(r.clone()));
            }
        }
        let prefix_ok = !prefix.is_empty()
            && prefix.len() <= 64
            && prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !prefix_ok {
            return Err(TargetError::Prefix(prefix.to_owned()));
        }
        let mut regions = regions.to_vec();
        regions.sort();
        regions.dedup();
        Ok(Target {
            partition: partition.to_owned(),
            account: account.map(str::to_owned),
            regions,
            prefix: prefix.to_owned(),
        })
    }

    /// The values a placeholder stands for.
    fn values(&self, name: &str) -> Vec<String> {
        match name {
            "partition" => vec![self.partition.clone()],
            "account" => vec![self.account.clone().unwrap_or_else(|| "*".into())],
            "region" if self.regions.is_empty() => vec!["*".into()],
            "region" => self.regions.clone(),
            "prefix" => vec![self.prefix.clone()],
            // Service principals in the China regions are documented under both domains;
            // a condition listing both matches either.
            "amazonaws" if self.partition == "aws-cn" => {
                vec!["amazonaws.com".into(), "amazonaws.com.cn".into()]
            }
            "amazonaws" => vec!["amazonaws.com".into()],
            other => panic!("unknown placeholder {{{other}}} in an ARN template"),
        }
    }

    /// Every string `template` stands for (several when a placeholder has several values).
    pub fn expand(&self, template: &str) -> Vec<String> {
        let Some(open) = template.find('{') else {
            return vec![template.to_owned()];
        };
        let close = open
            + template[open..]
                .find('}')
                .expect("an ARN template's `{` is closed");
        let name = &template[open + 1..close];
        let rest = self.expand(&template[close + 1..]);
        let mut out = Vec::new();
        for value in self.values(name) {
            for tail in &rest {
                out.push(format!("{}{value}{tail}", &template[..open]));
            }
        }
        out
    }
}

/// One string, or several: how IAM writes a single resource or condition value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OneOrMany(pub Vec<String>);

impl Serialize for OneOrMany {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [one] => s.serialize_str(one),
            many => {
                let mut seq = s.serialize_seq(Some(many.len()))?;
                for v in many {
                    seq.serialize_element(v)?;
                }
                seq.end()
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Statement {
    #[serde(rename = "Sid")]
    pub sid: &'static str,
    #[serde(rename = "Effect")]
    pub effect: &'static str,
    /// Sorted, unique.
    #[serde(rename = "Action")]
    pub action: Vec<&'static str>,
    #[serde(rename = "Resource")]
    pub resource: OneOrMany,
    #[serde(rename = "Condition", skip_serializing_if = "BTreeMap::is_empty")]
    pub condition: BTreeMap<String, BTreeMap<String, OneOrMany>>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Policy {
    #[serde(rename = "Version")]
    pub version: &'static str,
    #[serde(rename = "Statement")]
    pub statement: Vec<Statement>,
}

/// The actions `grant` gives to any of `scopes`, sorted and unique.
pub fn grant_actions(grant: &Grant, scopes: &BTreeSet<Scope>) -> Vec<&'static str> {
    let actions: BTreeSet<&'static str> = grant
        .actions
        .iter()
        .filter(|(needed_by, _)| needed_by.iter().any(|s| scopes.contains(s)))
        .map(|(_, action)| *action)
        .collect();
    actions.into_iter().collect()
}

/// Every action `scopes` need, sorted and unique.
pub fn actions(scopes: &BTreeSet<Scope>) -> BTreeSet<&'static str> {
    GRANTS
        .iter()
        .flat_map(|g| grant_actions(g, scopes))
        .collect()
}

/// `grant`'s statement for `scopes` in `target`; None when the scopes need none of it.
pub fn statement(grant: &Grant, scopes: &BTreeSet<Scope>, target: &Target) -> Option<Statement> {
    let action = grant_actions(grant, scopes);
    if action.is_empty() {
        return None;
    }
    let mut resource: Vec<String> = Vec::new();
    for r in grant.resources.iter().flat_map(|r| target.expand(r)) {
        if !resource.contains(&r) {
            resource.push(r);
        }
    }
    let mut condition: BTreeMap<String, BTreeMap<String, OneOrMany>> = BTreeMap::new();
    for (op, key, values) in grant.conditions {
        let values: Vec<String> = values.iter().flat_map(|v| target.expand(v)).collect();
        for key in target.expand(key) {
            condition
                .entry((*op).to_owned())
                .or_default()
                .insert(key, OneOrMany(values.clone()));
        }
    }
    Some(Statement {
        sid: grant.sid,
        effect: "Allow",
        action,
        resource: OneOrMany(resource),
        condition,
    })
}

/// The policy `scopes` need in `target`: one statement per capability, in [`GRANTS`]'
/// order, whatever the order the scopes were asked in.
pub fn policy(scopes: &BTreeSet<Scope>, target: &Target) -> Policy {
    Policy {
        version: "2012-10-17",
        statement: GRANTS
            .iter()
            .filter_map(|g| statement(g, scopes, target))
            .collect(),
    }
}

/// The document as printed: pretty JSON and a newline.
pub fn render(policy: &Policy) -> String {
    let mut text = serde_json::to_string_pretty(policy).expect("a policy serializes");
    text.push('\n');
    text
}

/// The policy's size as IAM counts it against its limits (whitespace does not count).
pub fn size(policy: &Policy) -> usize {
    serde_json::to_string(policy)
        .expect("a policy serializes")
        .len()
}

/// A statement alone is larger than the limit a part must keep to.
#[derive(Debug, thiserror::Error)]
#[error("statement {sid} alone is {size} characters, more than {limit}: it cannot go into a policy of that size")]
pub struct TooLarge {
    pub sid: &'static str,
    pub size: usize,
    pub limit: usize,
}

/// Splits `policy` into as few policies as needed, in order, each at most `limit`
/// characters (without whitespace): for a role that needs several managed policies
/// (6,144 characters each) where one would be too large. Statements are independent
/// Allows, so any split grants exactly what the whole policy grants.
pub fn split(policy: &Policy, limit: usize) -> Result<Vec<Policy>, TooLarge> {
    let empty = |statement| Policy {
        version: policy.version,
        statement,
    };
    let mut parts: Vec<Policy> = Vec::new();
    for s in &policy.statement {
        let alone = empty(vec![s.clone()]);
        if size(&alone) > limit {
            return Err(TooLarge {
                sid: s.sid,
                size: size(&alone),
                limit,
            });
        }
        let fits = parts.last().is_some_and(|last| {
            let mut grown = last.clone();
            grown.statement.push(s.clone());
            size(&grown) <= limit
        });
        match parts.last_mut() {
            Some(last) if fits => last.statement.push(s.clone()),
            _ => parts.push(alone),
        }
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> BTreeSet<Scope> {
        Scope::ALL.into_iter().collect()
    }

    fn only(s: Scope) -> BTreeSet<Scope> {
        [s].into_iter().collect()
    }

    fn anywhere() -> Target {
        Target::new("aws", None, &[], "amictl-").unwrap()
    }

    fn find(p: &Policy, sid: &str) -> serde_json::Value {
        let s = p
            .statement
            .iter()
            .find(|s| s.sid == sid)
            .unwrap_or_else(|| panic!("no statement {sid}"));
        serde_json::to_value(s).unwrap()
    }

    #[test]
    fn actions_are_named_well_formed_and_never_wildcards() {
        for g in GRANTS {
            assert!(
                !g.sid.is_empty() && g.sid.chars().all(|c| c.is_ascii_alphanumeric()),
                "Sid {:?} must be alphanumeric",
                g.sid
            );
            assert!(
                !g.actions.is_empty() && !g.resources.is_empty(),
                "{}",
                g.sid
            );
            for (scopes, action) in g.actions {
                assert!(
                    !scopes.is_empty(),
                    "{action} in {} is needed by no scope",
                    g.sid
                );
                let (service, name) = action.split_once(':').expect("service:Action");
                assert!(
                    !service.is_empty()
                        && service
                            .chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                    "{action}"
                );
                assert!(
                    name.starts_with(|c: char| c.is_ascii_uppercase())
                        && name.chars().all(|c| c.is_ascii_alphanumeric()),
                    "{action}: no wildcards, no odd characters"
                );
            }
        }
    }

    #[test]
    fn sids_are_unique_and_actions_listed_once_per_grant() {
        let mut sids = BTreeSet::new();
        for g in GRANTS {
            assert!(sids.insert(g.sid), "Sid {} twice", g.sid);
            let mut seen = BTreeSet::new();
            for (_, a) in g.actions {
                assert!(seen.insert(*a), "{a} twice in {}", g.sid);
            }
        }
    }

    #[test]
    fn unscoped_statements_hold_only_actions_without_resource_level_permissions() {
        for g in GRANTS.iter().filter(|g| g.resources.contains(&"*")) {
            assert_eq!(g.resources, &["*"], "{}: \"*\" alone", g.sid);
            if !g.conditions.is_empty() {
                continue;
            }
            for (_, a) in g.actions {
                let name = a.split_once(':').unwrap().1;
                assert!(
                    name.starts_with("Describe") || UNSCOPED_ACTIONS.contains(a),
                    "{a} in {} is granted on \"*\" without a condition",
                    g.sid
                );
            }
        }
    }

    #[test]
    fn statements_sort_their_actions_and_follow_the_grants_order() {
        let p = policy(&all(), &anywhere());
        assert_eq!(p.version, "2012-10-17");
        assert_eq!(p.statement.len(), GRANTS.len());
        for (s, g) in p.statement.iter().zip(GRANTS) {
            assert_eq!(s.sid, g.sid);
            let mut sorted = s.action.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(s.action, sorted, "{}", s.sid);
        }
    }

    #[test]
    fn each_scope_gets_what_its_commands_call_and_no_more() {
        let destroy = actions(&only(Destroy));
        assert_eq!(
            destroy.into_iter().collect::<Vec<_>>(),
            [
                // The fleet's Auto Scaling groups and their launch templates go first.
                "autoscaling:DeleteAutoScalingGroup",
                "autoscaling:DescribeAutoScalingGroups",
                // `--stack`: the outputs name the lock's bucket.
                "cloudformation:DescribeStacks",
                "ec2:DeleteLaunchTemplate",
                "ec2:DescribeInstances",
                "ec2:TerminateInstances",
                // The fleet's lock.
                "s3:DeleteObject",
                "s3:GetObject",
                // A missing lease is then 404, not 403.
                "s3:ListBucket",
                "s3:PutObject"
            ]
        );
        for s in [Health, Drift] {
            assert_eq!(
                actions(&only(s)).into_iter().collect::<Vec<_>>(),
                [
                    "ec2:DescribeInstances",
                    "ssm:CancelCommand",
                    "ssm:GetCommandInvocation",
                    "ssm:GetDocument",
                    "ssm:SendCommand"
                ],
                "{s:?}"
            );
        }
        let rollout = actions(&only(Rollout));
        for a in [
            "ec2:RunInstances",
            "iam:PassRole",
            "ec2:CreateTags",
            "ec2:DeleteTags",
            "ec2:TerminateInstances",
            "ec2:DescribeSubnets",
            "elasticloadbalancing:RegisterTargets",
            "elasticloadbalancing:DeregisterTargets",
            "elasticloadbalancing:DescribeTargetHealth",
            "cloudwatch:DescribeAlarms",
            "cloudformation:DescribeStacks",
            "ssm:SendCommand",
        ] {
            assert!(rollout.contains(a), "rollout needs {a}");
        }
        assert!(!rollout.contains("ec2:DeregisterImage"));
        assert!(!rollout.contains("cloudformation:CreateChangeSet"));
        let publish = actions(&only(Publish));
        for a in [
            "ebs:StartSnapshot",
            "ec2:GetEbsEncryptionByDefault",
            "ec2:RegisterImage",
            "ec2:ImportSnapshot",
            "s3:PutObject",
            "ec2:DeregisterImage",
            "ec2:DeleteSnapshot",
            "ec2:CopyImage",
        ] {
            assert!(publish.contains(a), "publish needs {a}");
        }
        assert!(!publish.contains("ec2:RunInstances"));
        assert!(!publish.contains("ec2:TerminateInstances"));
        let stack = actions(&only(Stack));
        for a in [
            "cloudformation:CreateChangeSet",
            "cloudformation:ExecuteChangeSet",
            "cloudformation:DescribeChangeSet",
            "cloudformation:DeleteChangeSet",
            "cloudformation:DescribeStacks",
            "cloudformation:DescribeStackEvents",
            "cloudformation:DeleteStack",
            "ec2:CreateVpc",
            "elasticloadbalancing:CreateLoadBalancer",
            "iam:CreateRole",
            "iam:AddRoleToInstanceProfile",
            "iam:PassRole",
            "cloudwatch:PutMetricAlarm",
            "s3:CreateBucket",
            "s3:PutBucketPolicy",
        ] {
            assert!(stack.contains(a), "stack needs {a}");
        }
        assert!(!stack.contains("iam:PutRolePolicy"), "no inline policies");
        assert!(!stack.contains("ec2:RunInstances"));
    }

    #[test]
    fn a_statement_carries_only_the_asked_scopes_actions() {
        let p = policy(&only(Destroy), &anywhere());
        let sids: Vec<&str> = p.statement.iter().map(|s| s.sid).collect();
        assert_eq!(
            sids,
            [
                "DescribeReadOnly",
                "FleetLock",
                "ImportStagingBucket",
                "TerminateFleetInstances",
                "DeleteFleetLaunchTemplates",
                "ChangeFleetGroups",
                "CloudFormationStacks"
            ]
        );
        assert_eq!(
            find(&p, "DescribeReadOnly")["Action"],
            serde_json::json!([
                "autoscaling:DescribeAutoScalingGroups",
                "ec2:DescribeInstances"
            ])
        );
        assert_eq!(
            find(&p, "ChangeFleetGroups")["Action"],
            serde_json::json!(["autoscaling:DeleteAutoScalingGroup"])
        );
    }

    #[test]
    fn a_split_policy_keeps_every_statement_in_order_within_the_limit() {
        let three = Target::new(
            "aws",
            Some("123456789012"),
            &["us-east-1".into(), "eu-west-1".into(), "us-west-2".into()],
            "amictl-",
        )
        .unwrap();
        let whole = policy(&all(), &three);
        assert!(size(&whole) > MANAGED_POLICY_LIMIT, "nothing to split");
        let parts = split(&whole, MANAGED_POLICY_LIMIT).unwrap();
        assert!(parts.len() >= 2);
        for p in &parts {
            assert!(size(p) <= MANAGED_POLICY_LIMIT, "{}", size(p));
            assert_eq!(p.version, "2012-10-17");
        }
        let rejoined: Vec<Statement> = parts.into_iter().flat_map(|p| p.statement).collect();
        assert_eq!(rejoined, whole.statement);
        // A limit no single statement fits names the statement.
        let e = split(&whole, 100).unwrap_err();
        assert_eq!(e.sid, whole.statement[0].sid);
        assert!(e.to_string().contains("more than 100"), "{e}");
    }

    #[test]
    fn fleet_instances_are_picked_by_their_tag() {
        let p = policy(&all(), &anywhere());
        let t = find(&p, "TerminateFleetInstances");
        assert_eq!(
            t["Condition"]["StringLike"]["aws:ResourceTag/amictl:fleet"],
            "amictl-*"
        );
        assert_eq!(t["Resource"], "arn:aws:ec2:*:*:instance/*");
        let r = find(&p, "RetireFleetInstances");
        assert_eq!(
            r["Action"],
            serde_json::json!(["ec2:CreateTags", "ec2:DeleteTags"])
        );
        assert_eq!(
            r["Condition"]["ForAllValues:StringEquals"]["aws:TagKeys"],
            crate::fleet::TAG_RETIRING
        );
        let l = find(&p, "LaunchFleetInstances");
        assert_eq!(
            l["Condition"]["StringLike"]["aws:RequestTag/amictl:fleet"],
            "amictl-*"
        );
        let s = find(&p, "RunCommandOnFleetInstances");
        assert_eq!(
            s["Condition"]["StringLike"]["ssm:resourceTag/amictl:fleet"],
            "amictl-*"
        );
        assert_eq!(FLEET_TAG, crate::fleet::TAG_FLEET);
        assert_eq!(
            find(&p, "RunHealthCheckDocument")["Resource"],
            "arn:aws:ssm:*:*:document/amictl-*HealthCheck"
        );
        let pass = find(&p, "PassFleetInstanceRole");
        assert_eq!(pass["Resource"], "arn:aws:iam::*:role/amictl-*");
        assert_eq!(
            pass["Condition"]["StringEquals"]["iam:PassedToService"],
            "ec2.amazonaws.com"
        );
    }

    #[test]
    fn arns_take_the_partition_account_regions_and_prefix() {
        let t = Target::new(
            "aws-cn",
            Some("123456789012"),
            &[
                "cn-north-1".into(),
                "cn-northwest-1".into(),
                "cn-north-1".into(),
            ],
            "web-",
        )
        .unwrap();
        let p = policy(&all(), &t);
        assert_eq!(
            find(&p, "CloudFormationStacks")["Resource"],
            serde_json::json!([
                "arn:aws-cn:cloudformation:cn-north-1:123456789012:stack/web-*/*",
                "arn:aws-cn:cloudformation:cn-northwest-1:123456789012:stack/web-*/*",
            ])
        );
        assert_eq!(
            find(&p, "StackBuckets")["Resource"],
            serde_json::json!([
                "arn:aws-cn:s3:::web-*import-123456789012-cn-north-1",
                "arn:aws-cn:s3:::web-*import-123456789012-cn-northwest-1",
                "arn:aws-cn:s3:::web-*logs-123456789012-cn-north-1",
                "arn:aws-cn:s3:::web-*logs-123456789012-cn-northwest-1",
            ])
        );
        let pass = find(&p, "PassFleetInstanceRole");
        assert_eq!(pass["Resource"], "arn:aws-cn:iam::123456789012:role/web-*");
        assert_eq!(
            pass["Condition"]["StringEquals"]["iam:PassedToService"],
            serde_json::json!(["ec2.amazonaws.com", "ec2.amazonaws.com.cn"])
        );
        assert_eq!(
            find(&p, "ManageOwnImages")["Resource"],
            serde_json::json!([
                "arn:aws-cn:ec2:cn-north-1::image/*",
                "arn:aws-cn:ec2:cn-northwest-1::image/*"
            ])
        );
        assert_eq!(
            find(&p, "StackInstanceRolePolicy")["Condition"]["ArnEquals"]["iam:PolicyARN"],
            "arn:aws-cn:iam::aws:policy/AmazonSSMManagedInstanceCore"
        );
    }

    #[test]
    fn targets_refuse_what_would_widen_or_break_an_arn() {
        assert!(Target::new(
            "aws-us-gov",
            Some("000000000000"),
            &["us-gov-west-1".into()],
            "a"
        )
        .is_ok());
        assert!(matches!(
            Target::new("azure", None, &[], "a"),
            Err(TargetError::Partition(_))
        ));
        for bad in ["12345", "*", "12345678901a"] {
            assert!(
                matches!(
                    Target::new("aws", Some(bad), &[], "a"),
                    Err(TargetError::Account(_))
                ),
                "{bad}"
            );
        }
        for bad in ["*", "us-east", "US-EAST-1", "us-east-1:x", ""] {
            assert!(
                matches!(
                    Target::new("aws", None, &[bad.into()], "a"),
                    Err(TargetError::Region(_))
                ),
                "{bad}"
            );
        }
        for bad in ["", "a*", "a:b", "a/b", "a b", &"a".repeat(65)] {
            let e = Target::new("aws", None, &[], bad).unwrap_err();
            assert!(e.to_string().contains("e.g. amictl-"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_document_is_deterministic_and_iam_shaped() {
        let a = render(&policy(&all(), &anywhere()));
        let b = render(&policy(&all(), &anywhere()));
        assert_eq!(a, b);
        let v: serde_json::Value = serde_json::from_str(&a).unwrap();
        assert_eq!(v["Version"], "2012-10-17");
        for s in v["Statement"].as_array().unwrap() {
            for k in s.as_object().unwrap().keys() {
                assert!(
                    ["Sid", "Effect", "Action", "Resource", "Condition"].contains(&k.as_str()),
                    "{k}"
                );
            }
            assert_eq!(s["Effect"], "Allow");
        }
        // Whitespace is not counted against IAM's limits.
        assert!(size(&policy(&all(), &anywhere())) < a.len());
    }

    #[test]
    fn names_match_the_rest_of_amictl() {
        assert_eq!(crate::stack::names::DEFAULT_PREFIX, "amictl-");
    }

    /// The stack grants assume the template's names and resource types: a template change
    /// that breaks an assumption fails here, not on someone's deploy.
    #[test]
    fn the_stack_template_fits_the_stack_grants() {
        let template = crate::stack::TEMPLATE;
        let types: BTreeSet<&str> = template
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Type: "))
            .map(|t| t.trim_matches('"'))
            .filter(|t| t.starts_with("AWS::"))
            .collect();
        assert!(types.len() > 10, "{types:?}");
        for t in &types {
            assert!(
                STACK_RESOURCE_TYPES.contains(t),
                "stack.yaml has a {t}: grant what CloudFormation needs to manage it (iam.rs, stack scope) and list it in STACK_RESOURCE_TYPES"
            );
        }
        // Every resource name is the prefix's: the ARNs above rely on it.
        for line in template.lines().map(str::trim) {
            let Some((key, value)) = line.split_once(": ") else {
                continue;
            };
            if key.ends_with("Name") && !key.contains(' ') && key != "MetricName" {
                assert!(
                    value.contains("${Prefix}") || value.starts_with("!Ref"),
                    "stack.yaml names a resource without the prefix: {line}"
                );
            }
        }
        assert!(template.contains("${Prefix}import-${AWS::AccountId}-${AWS::Region}"));
        assert!(template.contains("${Prefix}logs-${AWS::AccountId}-${AWS::Region}"));
        assert!(template.contains("Name: !Sub \"${Prefix}tg\""));
        assert!(template.contains("Name: !Sub \"${Prefix}alb\""));
        // The instance role gets only the managed policy StackInstanceRolePolicy allows.
        let mut in_managed = false;
        for line in template.lines().map(str::trim) {
            if line.starts_with("ManagedPolicyArns:") {
                in_managed = true;
            } else if in_managed && line.starts_with("- ") {
                assert!(line.contains(INSTANCE_ROLE_POLICY), "{line}");
            } else {
                in_managed = false;
            }
        }
        assert!(!template.contains("AWS::IAM::Policy"));
        assert!(!template.contains("PermissionsBoundary"));
    }

    /// The network grants reach only what carries the prefix's tag: every network resource
    /// of the template carries `amictl:prefix` = its Prefix parameter, and those without
    /// tags belong to one that does.
    #[test]
    fn the_templates_network_carries_the_prefix_tag() {
        use serde_yaml::Value;
        let template: Value = serde_yaml::from_str(crate::stack::TEMPLATE).unwrap();
        let tagged = [
            "AWS::EC2::InternetGateway",
            "AWS::EC2::RouteTable",
            "AWS::EC2::SecurityGroup",
            "AWS::EC2::Subnet",
            "AWS::EC2::VPC",
        ];
        // Authorized against the tagged resources they name (StackNetwork).
        let untagged = [
            "AWS::EC2::Route",
            "AWS::EC2::SecurityGroupIngress",
            "AWS::EC2::SubnetRouteTableAssociation",
            "AWS::EC2::VPCGatewayAttachment",
        ];
        let mut seen = BTreeSet::new();
        for (name, resource) in template["Resources"].as_mapping().unwrap() {
            let name = name.as_str().unwrap();
            let kind = resource["Type"].as_str().unwrap();
            if !kind.starts_with("AWS::EC2::") {
                continue;
            }
            seen.insert(kind);
            assert!(
                tagged.contains(&kind) || untagged.contains(&kind),
                "{name}: {kind} is new: tag it amictl:prefix and grant it by that tag, or say which tagged resource authorizes it"
            );
            if !tagged.contains(&kind) {
                continue;
            }
            let tags = resource["Properties"]["Tags"].as_sequence();
            let prefix_tag = tags
                .into_iter()
                .flatten()
                .find(|t| t["Key"].as_str() == Some(crate::image::register::TAG_PREFIX));
            let value = prefix_tag.map(|t| &t["Value"]);
            assert!(
                matches!(value, Some(Value::Tagged(t)) if t.tag == "Ref" && t.value == "Prefix"),
                "{name} ({kind}) must carry amictl:prefix = !Ref Prefix: {value:?}"
            );
        }
        assert_eq!(seen.len(), tagged.len() + untagged.len(), "{seen:?}");
        // Every network type the stack grants is one of these, and its create call is one
        // the tag-on-create statement allows.
        for t in STACK_RESOURCE_TYPES
            .iter()
            .filter(|t| t.starts_with("AWS::EC2::"))
        {
            assert!(tagged.contains(t) || untagged.contains(t), "{t}");
        }
        let creates: BTreeSet<&str> = GRANTS
            .iter()
            .filter(|g| g.sid.starts_with("StackCreate"))
            .flat_map(|g| g.actions.iter().map(|(_, a)| a.trim_start_matches("ec2:")))
            .collect();
        assert_eq!(
            creates,
            NETWORK_CREATE_ACTIONS
                .iter()
                .copied()
                .collect::<BTreeSet<_>>()
        );
    }

    #[test]
    fn the_stacks_network_is_reached_only_through_the_prefix_tag() {
        let p = policy(&only(Stack), &anywhere());
        let network: Vec<String> = NETWORK.iter().flat_map(|n| anywhere().expand(n)).collect();
        let mut checked = 0;
        for s in &p.statement {
            if !s.resource.0.iter().any(|r| network.contains(r)) {
                continue;
            }
            checked += 1;
            let v = serde_json::to_value(s).unwrap();
            let like = &v["Condition"]["StringLike"];
            let resource_tag = &like["aws:ResourceTag/amictl:prefix"];
            let request_tag = &like["aws:RequestTag/amictl:prefix"];
            assert!(
                resource_tag == "amictl-*" || request_tag == "amictl-*",
                "{}: reaches the network without the prefix's tag",
                s.sid
            );
            // Tagging what exists needs its tag: a request's own tags prove nothing.
            if s.action.contains(&"ec2:CreateTags") && resource_tag != "amictl-*" {
                assert!(
                    !v["Condition"]["StringEquals"]["ec2:CreateAction"].is_null(),
                    "{}: tags what exists without its tag",
                    s.sid
                );
            }
        }
        assert_eq!(checked, 5, "the network statements");
        // A create authorized against the new resource's tags names no VPC besides its own:
        // the parent VPC of a subnet, route table or security group must carry the tag.
        let create = find(&p, "StackCreateNetwork");
        assert!(
            !create["Resource"].to_string().contains(":vpc/"),
            "{create}"
        );
    }

    /// SendCommand reaches amictl's documents (each scope the ones its commands send) and
    /// fleet instances, nothing else; and no scope that sends may also write a document.
    #[test]
    fn send_command_reaches_only_amictls_documents() {
        use crate::ssm::Document::{DriftReport, HealthCheck, RestartAgent};
        let sent = |scope: Scope| -> Vec<String> {
            let p = policy(&only(scope), &anywhere());
            let mut docs = Vec::new();
            for s in p
                .statement
                .iter()
                .filter(|s| s.action.contains(&"ssm:SendCommand"))
            {
                for r in &s.resource.0 {
                    if r.ends_with(":instance/*") {
                        continue;
                    }
                    let doc = crate::ssm::Document::ALL
                        .into_iter()
                        .find(|d| *r == format!("arn:aws:ssm:*:*:document/amictl-*{}", d.suffix()))
                        .unwrap_or_else(|| panic!("{scope:?}: ssm:SendCommand on {r}"));
                    docs.push(doc.suffix().to_owned());
                }
            }
            docs
        };
        assert_eq!(sent(Rollout), [HealthCheck.suffix()]);
        assert_eq!(sent(Health), [HealthCheck.suffix(), RestartAgent.suffix()]);
        assert_eq!(sent(Drift), [HealthCheck.suffix(), DriftReport.suffix()]);
        assert!(!render(&policy(&all(), &anywhere())).contains("AWS-RunShellScript"));
        for s in [Health, Drift] {
            for write in [
                "ssm:CreateDocument",
                "ssm:UpdateDocument",
                "ssm:UpdateDocumentDefaultVersion",
            ] {
                assert!(!actions(&only(s)).contains(write), "{s:?} has {write}");
            }
        }
        let rollout = actions(&only(Rollout));
        assert!(rollout.contains("ssm:CreateDocument") && rollout.contains("ssm:UpdateDocument"));
    }
}

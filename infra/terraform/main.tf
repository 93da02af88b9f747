# The buckets the shipped configs name (mdland-data: shards; mdland-runs: checkpoints, exports, reports;
# mdland-models: SD 1.x and STAR weights) and the IAM policy mdland's jobs need.
#   terraform init && terraform apply            # or -var prefix=acme-mdland, and the same prefix in the configs
# The cluster launcher's nodes get their instance profiles (<prefix>-head, <prefix>-nodes) and ImageId (`node_ami`)
# from here (cluster/aws-gpu.yaml); on EKS attach `policy_arn` to the pods' service account (IRSA) instead.
terraform {
  required_providers {
    aws = { source = "hashicorp/aws", version = ">= 5.0" }
  }
}

variable "prefix" {
  type        = string
  default     = "mdland"
  description = "bucket names are <prefix>-data, <prefix>-runs and <prefix>-models"
}

variable "region" {
  type    = string
  default = "us-west-2"
}

variable "noncurrent_days" {
  type        = number
  default     = 30
  description = "days an overwritten or deleted object's old version is kept (checkpoints churn)"
}

provider "aws" {
  region = var.region
}

resource "aws_s3_bucket" "mdland" {
  for_each = toset(["data", "runs", "models"])
  bucket   = "${var.prefix}-${each.key}"
}

resource "aws_s3_bucket_versioning" "mdland" {
  for_each = aws_s3_bucket.mdland
  bucket   = each.value.id
  versioning_configuration { status = "Enabled" }
}

# Versioning guards against a bad overwrite; without expiry, every replaced checkpoint would be billed forever.
resource "aws_s3_bucket_lifecycle_configuration" "mdland" {
  for_each   = aws_s3_bucket.mdland
  bucket     = each.value.id
  depends_on = [aws_s3_bucket_versioning.mdland]
  rule {
    id     = "expire-old-versions"
    status = "Enabled"
    filter {}
    noncurrent_version_expiration { noncurrent_days = var.noncurrent_days }
    abort_incomplete_multipart_upload { days_after_initiation = 7 }
  }
}

resource "aws_s3_bucket_public_access_block" "mdland" {
  for_each                = aws_s3_bucket.mdland
  bucket                  = each.value.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

# What the storage layer and Ray Train's checkpointing do: list, read, write (incl. multipart), delete.
data "aws_iam_policy_document" "mdland_jobs" {
  statement {
    actions   = ["s3:ListBucket", "s3:GetBucketLocation", "s3:ListBucketMultipartUploads"]
    resources = [for b in aws_s3_bucket.mdland : b.arn]
  }
  statement {
    actions = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
               "s3:ListMultipartUploadParts"]
    resources = [for b in aws_s3_bucket.mdland : "${b.arn}/*"]
  }
}

resource "aws_iam_policy" "mdland_jobs" {
  name   = "${var.prefix}-jobs"
  policy = data.aws_iam_policy_document.mdland_jobs.json
}

# Instance roles for the Ray cluster launcher: workers read and write the buckets; the head also launches and stops
# workers, handing them the workers' role.
data "aws_iam_policy_document" "ec2_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "mdland" {
  for_each           = toset(["head", "nodes"])
  name               = "${var.prefix}-${each.key}"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
}

resource "aws_iam_role_policy_attachment" "jobs" {
  for_each   = aws_iam_role.mdland
  role       = each.value.name
  policy_arn = aws_iam_policy.mdland_jobs.arn
}

resource "aws_iam_role_policy_attachment" "head_ec2" {
  role       = aws_iam_role.mdland["head"].name
  policy_arn = "arn:aws:iam::aws:policy/AmazonEC2FullAccess"
}

data "aws_iam_policy_document" "pass_nodes_role" {
  statement {
    actions   = ["iam:PassRole"]
    resources = [aws_iam_role.mdland["nodes"].arn]
  }
}

resource "aws_iam_role_policy" "head_pass_role" {
  name   = "pass-node-roles"
  role   = aws_iam_role.mdland["head"].name
  policy = data.aws_iam_policy_document.pass_nodes_role.json
}

resource "aws_iam_instance_profile" "mdland" {
  for_each = aws_iam_role.mdland
  name     = each.value.name
  role     = each.value.name
}

# The newest NVIDIA-driver Deep Learning base AMI (Docker and the NVIDIA container toolkit included) in the region.
data "aws_ami" "node" {
  most_recent = true
  owners      = ["amazon"]
  filter {
    name   = "name"
    values = ["Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) *"]
  }
  filter {
    name   = "architecture"
    values = ["x86_64"]
  }
}

output "instance_profiles" {
  value = { for k, p in aws_iam_instance_profile.mdland : k => p.name }
}

output "node_ami" {
  value = data.aws_ami.node.id
}

output "buckets" {
  value = [for b in aws_s3_bucket.mdland : b.bucket]
}

output "policy_arn" {
  value = aws_iam_policy.mdland_jobs.arn
}

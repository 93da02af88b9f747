# The buckets the shipped configs name (mdland-data: shards; mdland-runs: checkpoints, exports, reports;
# mdland-models: SD 1.x and STAR weights) and the IAM policy mdland's jobs need.
#   terraform init && terraform apply            # or -var prefix=acme-mdland, and the same prefix in the configs
# Attach `mdland_jobs` to the nodes' instance role (cluster launcher: IamInstanceProfile; EKS: IRSA).
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

output "buckets" {
  value = [for b in aws_s3_bucket.mdland : b.bucket]
}

output "policy_arn" {
  value = aws_iam_policy.mdland_jobs.arn
}

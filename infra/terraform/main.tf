# A cloud bucket for mdland's data, runs and models, and the IAM policy its jobs need.
#   terraform init && terraform apply -var bucket=my-mdland
# Attach `mdland_jobs` to the nodes' instance role (cluster launcher: IamInstanceProfile; EKS: IRSA).
terraform {
  required_providers {
    aws = { source = "hashicorp/aws", version = ">= 5.0" }
  }
}

variable "bucket" {
  type        = string
  description = "bucket name for shards, checkpoints, exports and models"
}

variable "region" {
  type    = string
  default = "us-west-2"
}

provider "aws" {
  region = var.region
}

resource "aws_s3_bucket" "mdland" {
  bucket = var.bucket
}

resource "aws_s3_bucket_versioning" "mdland" {
  bucket = aws_s3_bucket.mdland.id
  versioning_configuration { status = "Enabled" }
}

resource "aws_s3_bucket_public_access_block" "mdland" {
  bucket                  = aws_s3_bucket.mdland.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

# What the storage layer and Ray Train's checkpointing do: list, read, write (incl. multipart), delete.
data "aws_iam_policy_document" "mdland_jobs" {
  statement {
    actions   = ["s3:ListBucket", "s3:GetBucketLocation", "s3:ListBucketMultipartUploads"]
    resources = [aws_s3_bucket.mdland.arn]
  }
  statement {
    actions = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
               "s3:ListMultipartUploadParts"]
    resources = ["${aws_s3_bucket.mdland.arn}/*"]
  }
}

resource "aws_iam_policy" "mdland_jobs" {
  name   = "mdland-jobs-${var.bucket}"
  policy = data.aws_iam_policy_document.mdland_jobs.json
}

output "bucket" {
  value = aws_s3_bucket.mdland.bucket
}

output "policy_arn" {
  value = aws_iam_policy.mdland_jobs.arn
}
